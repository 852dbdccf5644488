from fgit_bench.cli import main

main()
