"""One rank of a real multi-process FGIT step (launched by torchrun in test_distributed).

Each rank takes its share of a fixed global batch, wraps the model in DDP or FSDP2
(``fully_shard`` per decoder layer and at the root, as Axolotl's FSDP2 path does), and
computes FGIT's loss with the trainer's normalisation: global N (one scalar all-reduce)
and the rank-local sum scaled by the world size. Rank 0 writes the loss, the full
gradients of a few parameters and the forward-call count of every rank.
"""

from __future__ import annotations

import argparse
import copy

import datasets
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_fgit.args import FGITConfig
from axolotl_fgit.collator import FGITPackedDataCollator
from axolotl_fgit.strategy import pair_strategy
from axolotl_fgit.trainer import batch_loss

PARAMS = ("model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight")


def global_batch(model_dir: str, data: str, n: int):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    strategy = pair_strategy(tok, 2048)
    rows = datasets.load_from_disk(data).select(range(n))
    return tok, [strategy.tokenize_prompt(dict(r)) for r in rows]


def step(model, tok, feats, cfg: FGITConfig, n_items, scale: int) -> torch.Tensor:
    batch = FGITPackedDataCollator(tok, return_tensors="pt")([copy.deepcopy(feats)])
    loss = batch_loss(model, batch, cfg, n_items).loss * scale
    loss.backward()
    return loss.detach()


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = param.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def named_grads(model) -> dict[str, torch.Tensor]:
    """Full gradients of the checked parameters (LoRA ones when the model has adapters)."""
    out = {}
    for name, param in model.named_parameters():
        short = name.replace("_fsdp_wrapped_module.", "").replace("base_model.model.", "")
        if param.grad is not None and (short in PARAMS or "lora_" in short and ".2." in short):
            out[short] = full_grad(param).detach().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--wrap", choices=["none", "ddp", "fsdp1", "fsdp2"], required=True)
    ap.add_argument("--detach", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = FGITConfig(detach_weights=args.detach)
    distributed = args.wrap != "none"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    tok, feats = global_batch(args.model, args.data, args.samples)
    mine = feats[rank::world]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    )
    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(
            model,
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            ),
        )
    model.train()
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1) and None)
    n_items = torch.tensor(sum(1 for f in mine for t in f["labels"][1:] if t != -100))
    if args.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dist.all_reduce(n_items)
        wrapped = DistributedDataParallel(model)
    elif args.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.all_reduce(n_items)
        for layer in decoder_layers(model):
            fully_shard(layer)
        wrapped = fully_shard(model)
    elif args.wrap == "fsdp1":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        dist.all_reduce(n_items)
        layer_cls = {type(decoder_layers(model)[0])}
        wrapped = FullyShardedDataParallel(
            model,
            auto_wrap_policy=functools.partial(
                transformer_auto_wrap_policy, transformer_layer_cls=layer_cls
            ),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )
    else:
        wrapped = model
    loss = step(wrapped, tok, mine, cfg, n_items, world)
    if args.wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            grads = named_grads(model)
    else:
        grads = named_grads(model)
    counts = torch.tensor([len(calls)])
    if distributed:
        dist.all_reduce(loss)
        loss /= world
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
        counts = torch.cat(gathered)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "forward_calls": counts.tolist()}, args.out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
