"""Loop #2 training: LoRA SFT of the memory specialist on curated chat data (peft + transformers.Trainer).

    python train_lora.py --model HF_ID_OR_PATH --data sft/x/train.jsonl --recipe sft/x/recipe.json \\
        --out adapters/x [--resume] [--merge] [--qlora]
    torchrun --nproc_per_node 8 train_lora.py ...                                   # data parallel
    accelerate launch --config_file scripts/accelerate/fsdp.yaml train_lora.py ...  # FSDP (32B)
    accelerate launch --config_file scripts/accelerate/zero3.yaml train_lora.py ... # DeepSpeed ZeRO-3

The model's own chat template renders each example; the loss is on assistant tokens only (the
turns the specialist should write, with their end-of-turn token); examples are cut at the
recipe's cutoff. The recipe's batch x grad_accum is the global batch (examples per optimizer
step) at any process count; each process runs micro-batches of the recipe's batch, lowered (and
its accumulation raised) until the memory estimate fits the GPU, or `--micro-batch N`; the plan
and the estimate are printed before the model is loaded and kept in train_config.json. Under N
processes an epoch's last global batch is filled up with repeated examples (accelerate's even
batches), so tokens_trained may exceed tokens_per_epoch by less than one global batch. bf16 and
gradient checkpointing are used on CUDA; `--qlora` loads the base in 4 bits (bitsandbytes, CUDA
only). `--save-every N` checkpoints to <out>/checkpoints/ (sharded under FSDP / ZeRO-3, through
accelerate) and `--resume` continues from the latest complete one. The out folder gets the
adapter, train_config.json, loss.json ({step, epoch, loss, lr} per optimizer step) and loss.png;
`--merge` also writes <out>/merged/, the base with the adapter folded in (what the authors served).

Why transformers.Trainer and not a hand-written loop: the scheduler length under several
processes, FSDP / ZeRO-3 model, optimizer and checkpoint handling, sharded
resume, and gradient-accumulation loss normalisation by token count all come from it. Why not
TRL's SFTTrainer: its assistant-only loss needs `{% generation %}` markers that the Qwen2.5 and
SmolLM2 templates lack; `assistant_labels` finds the spans for any template, and that is the only
part TRL would have replaced.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

import agent as agent_mod
from curate_sft import batch_problem, check_recipe

TARGET_MODULES = {
    "ATTN": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "QV": ["q_proj", "v_proj"],
    "MLP": ["gate_proj", "up_proj", "down_proj"],
    "ALL": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
IGNORE = -100   # the label transformers' causal-LM loss skips
GIB = 2 ** 30
GPU_USABLE = 0.9   # share of a GPU's memory the estimate may fill: it leaves out the CUDA context,
                   # the allocator's fragmentation and NCCL buffers, a few GiB on an 80 GB GPU


def assistant_labels(tok, messages, cutoff):
    """(input_ids, labels): the chat-template tokens of a conversation, with labels only on the
    assistant turns (their text and end-of-turn token). Spans come from rendering each prefix of
    the conversation, so any template whose renderings extend each other works."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "assistant spans cannot be located")
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:cutoff]
    labels = [tid if any(a <= start < b for a, b in spans) else IGNORE
              for tid, (start, _) in zip(ids, enc["offset_mapping"][:cutoff])]
    return ids, labels


def collate(batch, pad_id):
    n = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.tensor(ex["input_ids"])
        labels[i, :k] = torch.tensor(ex["labels"])
        mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def plot_loss(losses, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], marker="o", ms=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latest_checkpoint(out):
    """The newest checkpoint that was written to the end (the Trainer writes trainer_state.json last)."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in (Path(out) / "checkpoints").glob("checkpoint-*")
                   if (p / "trainer_state.json").exists())
    return steps[-1][1] if steps else None


def sharding():
    """How `accelerate launch` will shard the model, from the environment it sets: None, "fsdp" or
    "zero3". accelerate applies both on GPUs only (on CPU it runs plain data parallel)."""
    if not torch.cuda.is_available():
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "zero3"
    return None


def parameter_counts(config, targets, rank):
    """Exact parameter counts of the model `config` describes, built on the meta device: all, those
    in its linear layers (what 4 bits quantize), and LoRA's at `rank` on `targets`. The class is
    built directly, not through from_config: under ZeRO-3 (registered by TrainingArguments)
    from_config would materialise a real model, partitioned over the GPUs, just to count it."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "in_linear_layers": sum(m.weight.numel() for n, m in linear.items() if "lm_head" not in n),
            "lora_parameters": sum(rank * (m.in_features + m.out_features) for n, m in linear.items()
                                   if n.split(".")[-1] in targets)}


def memory_estimate(config, counts, batch, seq_len, processes=1, sharded=False, qlora=False, bf16=True,
                    checkpointing=True):
    """Rough GPU memory per process, in bytes, by part, for a micro-batch of `batch` sequences of
    `seq_len` tokens. Activations assume SDPA / flash attention (no length^2 term): with gradient
    checkpointing one hidden state per layer is kept, plus one layer recomputed; the logits are
    held in the compute dtype, upcast to fp32 for the loss and given an fp32 gradient. Trainable
    LoRA weights are fp32 (peft's default) with fp32 gradients and two Adam moments."""
    params, in_layers, lora = counts["parameters"], counts["in_linear_layers"], counts["lora_parameters"]
    act = 2 if bf16 else 4
    if qlora:   # NF4 weights with double-quantised scales (~0.516 byte / weight); the rest stays 16-bit
        weights = in_layers * 0.516 + (params - in_layers) * 2
    else:
        weights = params * act
    shard = processes if sharded else 1
    h, n_layers = config.hidden_size, config.num_hidden_layers
    inter, vocab = config.intermediate_size, config.vocab_size
    tokens = batch * seq_len
    one_layer = tokens * (10 * h + 3 * inter) * act
    est = {"base weights": weights / shard,
           "LoRA weights, grads, Adam": lora * 16 / shard,
           "activations": (tokens * h * n_layers * act + one_layer) if checkpointing else one_layer * n_layers,
           "logits and loss": tokens * vocab * (act + 8)}
    est["total"] = sum(est.values())
    return est


def batch_plan(config, recipe, counts, seq_len, processes, gpu_bytes=None, micro_batch=None, **how):
    """How the recipe's global batch runs on `processes` processes: (plan, memory estimate). The
    global batch, batch x grad_accum examples per optimizer step, is the same at any process
    count. Each process takes micro-batches of the recipe's batch (or fewer: it must divide the
    process's share), lowered until the estimate fits GPU_USABLE of `gpu_bytes`, with gradient accumulation
    making up the rest; `micro_batch` forces one. `how`: memory_estimate's sharding and precision.
    Raises ValueError, in one line, when the global batch does not split or nothing fits."""
    if problem := batch_problem(recipe, processes):   # the rule the training engine's decisions obey
        raise ValueError(problem)
    total = recipe["batch"] * recipe["grad_accum"]
    share = total // processes
    if micro_batch and share % micro_batch:
        raise ValueError(f"--micro-batch {micro_batch} does not divide the {share} examples per process and step")
    sizes = [micro_batch] if micro_batch else [m for m in range(min(recipe["batch"], share), 0, -1) if share % m == 0]
    for m in sizes:
        est = memory_estimate(config, counts, m, seq_len, processes, **how)
        if micro_batch or gpu_bytes is None or est["total"] <= GPU_USABLE * gpu_bytes:
            return {"global_batch": total, "micro_batch": m, "grad_accum": share // m, "processes": processes}, est
    raise ValueError(f"even a micro-batch of 1 needs about {est['total'] / GIB:.1f} GiB per process, more than "
                     f"{GPU_USABLE:.0%} of the GPU's {gpu_bytes / GIB:.1f} GiB: use more GPUs with sharding, --qlora or a shorter cutoff")


def print_estimate(est, counts, how):
    print(f"memory estimate per process ({how}); rough, CUDA context and fragmentation not counted:")
    for k, v in est.items():
        print(f"    {k:<28}{v / GIB:9.2f} GiB")
    print(f"    ({counts['parameters'] / 1e9:.2f} B parameters, {counts['lora_parameters'] / 1e6:.1f} M trainable)")


def loss_rows(log_history):
    """loss.json from the Trainer's log: one row per optimizer step. The Trainer's epoch is
    fractional and reaches 1.0 on the last step of epoch 0, so the 0-based epoch of a step is
    ceil(epoch) - 1."""
    return [{"step": x["step"], "epoch": max(0, math.ceil(round(x["epoch"], 6)) - 1),
             "loss": x["loss"], "lr": x["learning_rate"]} for x in log_history if "loss" in x]


def load_base(model, dtype, qlora=False, device_map=None):
    from transformers import AutoModelForCausalLM
    path, kwargs = agent_mod.model_path(model)
    if qlora:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)   # 16-bit storage: FSDP can shard it
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)


def merge(model, adapter, out):
    """The base with the adapter folded in, in 16-bit (never from the 4-bit base), plus the tokenizer:
    a plain model folder that any server loads."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    cuda = torch.cuda.is_available()
    base = load_base(model, torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    path, kwargs = agent_mod.model_path(model)
    AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file")).save_pretrained(out)
    print(f"merged model -> {out}")


def load_examples(path, tok, cutoff):
    """(the file's bytes, its conversations, the tokenized examples that keep an assistant token
    within `cutoff`); SystemExit when none does."""
    raw = Path(path).read_bytes()
    examples = [json.loads(line)["messages"] for line in raw.decode().splitlines() if line.strip()]
    data = [dict(zip(("input_ids", "labels"), assistant_labels(tok, m, cutoff))) for m in examples]
    data = [ex for ex in data if any(x != IGNORE for x in ex["labels"][1:])]
    if not data:
        raise SystemExit("train_lora.py: no example keeps an assistant token within the cutoff")
    return raw, examples, data


def add_lora(model, recipe, qlora):
    """The model with LoRA adapters on those of the recipe's target modules it has, and their names."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(set(TARGET_MODULES[recipe["target"]]) & {n.split(".")[-1] for n, _ in model.named_modules()},
                     key=TARGET_MODULES["ALL"].index)
    if not targets:
        raise SystemExit(f"train_lora.py: the model has none of the {recipe['target']} modules "
                         f"{TARGET_MODULES[recipe['target']]}")
    if qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"],
                                             lora_dropout=recipe["dropout"], target_modules=targets,
                                             task_type="CAUSAL_LM"))
    return model, targets


def train(args):
    from transformers import AutoConfig, AutoTokenizer, Trainer, TrainingArguments, set_seed

    out = Path(args.out)
    recipe = check_recipe(json.loads(Path(args.recipe).read_text()))
    for key in ("lr", "epochs", "rank"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    main = int(os.environ.get("RANK", "0")) == 0
    path, kwargs = agent_mod.model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    raw, examples, data = load_examples(args.data, tok, recipe["cutoff"])
    # The batch plan comes before TrainingArguments, which takes it; the process count is the
    # launcher's (torchrun and accelerate launch set WORLD_SIZE).
    config = AutoConfig.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
    shard, world = sharding(), int(os.environ.get("WORLD_SIZE", "1"))
    counts = parameter_counts(config, set(TARGET_MODULES[recipe["target"]]), recipe["rank"])
    gpu_bytes = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory if cuda else None
    try:
        plan, est = batch_plan(config, recipe, counts, max(len(ex["input_ids"]) for ex in data), world, gpu_bytes,
                               args.micro_batch, sharded=shard is not None, qlora=args.qlora, bf16=bf16,
                               checkpointing=cuda)
    except ValueError as e:
        raise SystemExit(f"train_lora.py: {e}")
    if main:
        print_estimate(est, counts, f"{world} process(es), {shard or 'no sharding'}, "
                                    f"{'4-bit' if args.qlora else str(dtype).split('.')[-1]} base, micro-batch "
                                    f"{plan['micro_batch']} x longest example")
        print(f"global batch {plan['global_batch']} = micro-batch {plan['micro_batch']} x accumulation "
              f"{plan['grad_accum']} x {world} process(es) (recipe: batch {recipe['batch']} x grad_accum "
              f"{recipe['grad_accum']}" + (f"; GPU {gpu_bytes / GIB:.1f} GiB)" if cuda else ")"))
    # Created before the model: it starts the process group, and under ZeRO-3 it must exist
    # before the model is loaded so that the weights are partitioned as they load.
    targs = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=plan["micro_batch"],
        gradient_accumulation_steps=plan["grad_accum"], num_train_epochs=recipe["epochs"],
        max_steps=args.max_steps or -1, learning_rate=recipe["lr"], lr_scheduler_type=recipe["scheduler"],
        warmup_steps=recipe["warmup"], weight_decay=0.0, logging_steps=1, seed=args.seed, data_seed=args.seed,
        save_strategy="steps" if args.save_every else "no", save_steps=args.save_every or 500,
        bf16=bf16, use_cpu=not cuda, activation_checkpointing=cuda,
        activation_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, report_to="none",
        disable_tqdm=True)
    set_seed(args.seed)    # the LoRA initialisation
    device_map = {"": targs.local_process_index} if args.qlora and shard is None else None
    model, targets = add_lora(load_base(args.model, dtype, qlora=args.qlora, device_map=device_map), recipe,
                              args.qlora)
    trainer = Trainer(model=model, args=targs, train_dataset=data,
                      data_collator=lambda batch: collate(batch, tok.pad_token_id))
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt and main:
        print(f"resumed from {ckpt}")
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if trainer.is_fsdp_enabled:   # checkpoints stay sharded; the adapter is gathered into one file
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))     # on every rank: under FSDP / ZeRO-3 the gathering is collective
    if main:
        losses = loss_rows(trainer.state.log_history)
        cfg = {"model": args.model, "data": str(args.data), "data_sha256": hashlib.sha256(raw).hexdigest(),
               "examples": len(examples), "examples_trained": len(data),
               "tokens_per_epoch": sum(len(ex["input_ids"]) for ex in data),
               "tokens_trained": int(trainer.state.num_input_tokens_seen), "recipe": recipe,
               "target_modules": targets, "optimizer_steps": trainer.state.global_step, "seed": args.seed,
               "bf16": bf16, "qlora": args.qlora, "gradient_checkpointing": cuda, "processes": targs.world_size,
               "global_batch": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size,
               "micro_batch": targs.per_device_train_batch_size, "grad_accum": targs.gradient_accumulation_steps,
               "sharding": "fsdp" if trainer.is_fsdp_enabled else "zero3" if trainer.is_deepspeed_enabled else None,
               "memory_estimate_gib": {k: round(v / GIB, 3) for k, v in est.items()},
               "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
               "first_loss": losses[0]["loss"] if losses else None,
               "final_loss": losses[-1]["loss"] if losses else None, "wall_s": round(time.time() - t0, 2),
               "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft", "accelerate")}}
        (out / "loss.json").write_text(json.dumps(losses, indent=1))
        plot_loss(losses, out / "loss.png", f"{args.model} LoRA r={recipe['rank']} on {len(data)} examples")
        (out / "train_config.json").write_text(json.dumps(cfg, indent=1))   # last: it marks the run finished
        print(f"adapter -> {out}; loss {cfg['first_loss']:.4f} -> {cfg['final_loss']:.4f} "
              f"over {cfg['optimizer_steps']} steps ({args.model})")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF id or folder of the base model, a .gguf file, smollm2-135m or tiny-random")
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint; a finished "
                                                          "training (train_config.json there) is not redone")
    p.add_argument("--merge", action="store_true", help="also write <out>/merged/: base + adapter, for serving")
    p.add_argument("--qlora", action="store_true", help="load the base in 4 bits (bitsandbytes; CUDA only)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="examples per process per forward pass (default: the recipe's batch, lowered to fit the GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="override the recipe")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe")
    p.add_argument("--rank", type=int, default=None, help="override the recipe")
    args = p.parse_args(argv)
    for f in (args.data, args.recipe):
        if not Path(f).is_file():
            p.exit(2, f"train_lora.py: error: no file {f}\n")
    try:
        check_recipe(json.loads(Path(args.recipe).read_text()))
        gguf = "gguf_file" in agent_mod.model_path(args.model)[1]
    except (ValueError, json.JSONDecodeError) as e:
        p.exit(2, f"train_lora.py: error: bad recipe {args.recipe}: {e}\n")
    except FileNotFoundError as e:
        p.exit(2, f"train_lora.py: error: {e}\n")
    if args.micro_batch is not None and args.micro_batch < 1:
        p.exit(2, "train_lora.py: error: --micro-batch must be a positive integer\n")
    if args.qlora and not torch.cuda.is_available():
        p.exit(2, "train_lora.py: error: --qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); none here\n")
    if args.qlora and gguf:
        p.exit(2, "train_lora.py: error: --qlora quantizes a 16-bit base; a GGUF file is dequantized instead\n")
    if args.qlora and importlib.util.find_spec("bitsandbytes") is None:
        p.exit(2, "train_lora.py: error: --qlora needs bitsandbytes: pip install bitsandbytes\n")
    out = Path(args.out)
    if args.resume and (out / "train_config.json").exists():
        print(f"{out} already holds a finished training (train_config.json); not redone")
    else:
        train(args)
    if args.merge and int(os.environ.get("RANK", "0")) == 0:
        merge(args.model, out, out / "merged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
