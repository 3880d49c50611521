"""The GPU paths in one run: HF evaluation batched on CUDA and its memory plan, the 32B plan on
the card, loop #2's training in bf16 / 4-bit / merged, FSDP's sharded save and resume, and the
two-model evaluation from the trained adapter. One table on stdout; logs and results.json in --out.

    bash bench/gpu_check.sh --out gpu_check       # one H100 or H200: about 8 minutes at most
    bash bench/gpu_check.sh --cpu --out /tmp/gc   # every step a CPU can run, at toy sizes

No weights can be downloaded on a lent GPU machine, and what travels there is capped at 64 MiB, so
the models have random weights and real architectures (Hugging Face's config of each), with
tiny-random's tokenizer (ids past its 2,048 decode to nothing). The 32B model is never written to
disk (61 GiB): its from_pretrained builds it from the config on the GPU instead, so the HF
backend's own path (memory plan, loading, batching, prefill, generate) runs on it for real.
Random weights prove the machinery and the memory, never skill.
"""
import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import agent  # noqa: E402
import envs  # noqa: E402

# Architectures from the models' config.json (weights random). --cpu keeps each shape at toy width.
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN_32B = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RECIPE = {"rank": 16, "alpha": 32, "dropout": 0.0, "lr": 2e-4, "epochs": 1, "batch": 4, "grad_accum": 2,
          "cutoff": 512, "scheduler": "cosine", "warmup": 0.05, "target": "ALL"}
GIB = 2 ** 30


def gib(n):
    return f"{n / GIB:.2f} GiB"


def random_model(out, sizes, dtype):
    """A folder with tiny-random's tokenizer and a Qwen2 of `sizes` with random weights."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(agent.tiny_random_path())
    config = Qwen2Config(**sizes, max_position_embeddings=32768, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


@contextlib.contextmanager
def built_from_config():
    """from_pretrained builds the model from its config with random weights, on the device it asks
    for, instead of reading weights: a 32B model is never written to disk."""
    from transformers import AutoConfig, AutoModelForCausalLM
    real = AutoModelForCausalLM.from_pretrained

    def build(path, dtype=None, device_map=None, **kwargs):
        device = f"cuda:{device_map['']}" if isinstance(device_map, dict) else "cpu"
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    AutoModelForCausalLM.from_pretrained = build
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = real


def peak_reset():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def plan_against(plan, measured):
    """The memory plan's predicted peak (weights + KV cache) beside the measured one."""
    planned = plan["weights_gib"] + plan["kv_gib"]
    return (f"plan {planned:.2f} GiB (weights {plan['weights_gib']:.2f} + KV {plan['kv_gib']:.2f} for "
            f"{plan['batch_tokens']:,} tokens), measured peak {gib(measured)}: "
            f"{'within' if measured <= planned * GIB else 'OVER'} the plan")


def compiled():
    """(graphs, frames) torch.compile has built in this process so far; a recompile is one more
    frame and graph, so both stay put when nothing compiles or recompiles."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


def play_v0(backend, episodes, concurrency, steps, memory, two_model=False):
    """v0 on Crafter through the harness: generated tokens and the seconds spent generating."""
    scaffold = agent.load_scaffold("v0")
    spent, tokens = [0.0], [0]
    generate = backend.generate

    def timed(requests):
        t0 = time.time()
        replies = generate(requests)
        spent[0] += time.time() - t0
        tokens[0] += sum(r.completion_tokens for r in replies)
        return replies
    backend.generate = timed
    games = []
    for seed in range(episodes):
        env = envs.make_env("crafter", seed=seed)
        games.append(agent.play(env, agent.make_agent("memory", env, scaffold, memory / f"ep{seed}", two_model),
                                seed, max_steps=steps))
    results = agent.run_episodes(games, backend, concurrency=concurrency)
    backend.generate = generate
    unfinished = [r for r in results if isinstance(r, agent.Unfinished)]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} episode(s) unfinished: {unfinished[0].reason}")
    return tokens[0], spent[0]


def hf_eval(args, out, models):
    """Step 1: 8 episodes batched against 1 at a time; the memory plan against the measured peak."""
    rows = []
    for name, path in models:
        rates, compiled_before = {}, compiled()
        for concurrency in (1, 8):
            peak_reset()
            budget = 8 * (2048 + args.max_new_tokens)
            backend = agent.HFBackend(str(path), max_new_tokens=args.max_new_tokens, batch_tokens=budget, seed=0)
            backend.generate([agent.Request([{"role": "user", "content": "Warm up."}])])   # first-call costs: untimed
            tokens, seconds = play_v0(backend, 8, concurrency, args.steps, out / f"memory_{name}_{concurrency}")
            rates[concurrency] = tokens / seconds
            measured, plan = peak(), backend.plan
            del backend
        graphs, frames = (now - before for now, before in zip(compiled(), compiled_before))
        rows.append((f"1 HF eval, {name}", f"{rates[1]:.0f} -> {rates[8]:.0f} generated tok/s, 1 -> 8 episodes: "
                     f"{rates[8] / rates[1]:.1f}x"))
        if plan:
            rows.append((f"1 memory plan, {name}", plan_against(plan, measured)))
        rows.append((f"1 compiled, {name}", f"{graphs} graph(s) compiled in {frames} frame(s) "
                                            "(torch.compile; a recompile adds one of each)"))
    return rows


def plan_32b(args, out):
    """Step 2: the memory plan at Qwen2.5-32B's size: a batch it refuses allocates nothing, a batch
    it accepts loads and runs."""
    path = out / "qwen32b-config"
    from transformers import AutoTokenizer, Qwen2Config
    sizes = {**QWEN_32B, **(TOY if args.cpu else {})}
    tok = AutoTokenizer.from_pretrained(agent.tiny_random_path())
    Qwen2Config(**sizes, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    rows = []
    peak_reset()
    if torch.cuda.is_available():
        before = torch.cuda.memory_allocated()
        try:
            agent.HFBackend(str(path), max_new_tokens=args.max_new_tokens, batch_tokens=10 ** 7)
            rows.append(("2 32B refused", "NOT refused: a 10M-token batch was accepted"))
        except agent.DoesNotFit as e:
            rows.append(("2 32B refused", f"{str(e)[:90]}...; allocated {torch.cuda.memory_allocated() - before} bytes"))
    budget = 8 * (1024 + args.max_new_tokens)
    with built_from_config():
        backend = agent.HFBackend(str(path), max_new_tokens=args.max_new_tokens, batch_tokens=budget, seed=0)
    # 284 to 914 tokens: unequal, so the batch is prefilled unpadded into a static cache (the path
    # the plan's 1.5x is for), and 8 x (914 + 32) fills 90% of the budget, so the peak tests the plan
    obs = envs.make_env("crafter", seed=0).reset()["text"]
    requests = [agent.Request([{"role": "user", "content": f"{i}: {obs * (3 + i)}"}]) for i in range(8)]
    lengths = [len(backend.tok(backend.tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"]) for r in requests]
    t0 = time.time()
    replies = backend.generate(requests)
    seconds = time.time() - t0
    errors = [r.error for r in replies if r.error]
    plan = backend.plan
    text = (f"{len(requests)} prompts of {min(lengths)}-{max(lengths)} tokens in "
            f"{len(agent.token_batches(lengths, budget, args.max_new_tokens))} batch(es), {seconds:.1f} s"
            + (f", errors: {errors[0]}" if errors else ""))
    rows.append(("2 32B batch ran", text))
    if plan:
        rows.append(("2 32B memory", plan_against(plan, peak())))
    del backend
    peak_reset()
    return rows


def run(cmd, log, env=None, check=True):
    """A command with its output in `log`; raises with the log's last line when it fails."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if check and r.returncode:
        last = [line for line in Path(log).read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit {r.returncode}: {last[0][:160]} (log {log.name})")
    return r


def train_row(name, folder):
    cfg = json.loads((folder / "train_config.json").read_text())
    est = cfg["memory_estimate_gib"]["total"]
    measured = cfg.get("peak_memory_gib")
    return (name, f"loss {cfg['first_loss']:.3f} -> {cfg['final_loss']:.3f} over {cfg['optimizer_steps']} steps, "
                  f"{cfg['wall_s']:.0f} s, peak " + (f"{measured:.2f} GiB vs estimate {est:.2f} GiB" if measured
                                                     else f"- (CPU) vs estimate {est:.2f} GiB"))


def loop2(args, out, mid):
    """Steps 3-4: train_lora.py in bf16, --qlora, --merge; FSDP's sharded save and resume."""
    data, recipe = out / "sft.jsonl", out / "recipe.json"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Step {i}: a tree is {i % 5 + 1} steps east. Log what matters."},
                {"role": "assistant", "content": f"<|APPEND|>map_notes.txt|Step {i}: tree {i % 5 + 1} east<|END|>"
                                                 "<|DONE|>"}]}) + "\n")
    recipe.write_text(json.dumps(RECIPE))
    train = [sys.executable, "train_lora.py", "--model", str(mid), "--data", str(data), "--recipe", str(recipe)]
    rows = []
    run([*train, "--out", str(out / "lora_bf16")], out / "train_bf16.log")
    rows.append(train_row("3 LoRA " + ("fp32 (CPU)" if args.cpu else "bf16"), out / "lora_bf16"))
    if torch.cuda.is_available():
        run([*train, "--out", str(out / "lora_qlora"), "--qlora"], out / "train_qlora.log")
        rows.append(train_row("3 QLoRA 4-bit", out / "lora_qlora"))
    else:
        rows.append(("3 QLoRA 4-bit", "skipped: bitsandbytes' 4-bit kernels need CUDA"))
    t0 = time.time()
    run([*train, "--out", str(out / "lora_bf16"), "--resume", "--merge"], out / "merge.log")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "lora_bf16" / "merged")
    rows.append(("3 merge", f"{sum(p.numel() for p in merged.parameters()) / 1e6:.1f} M parameters, loads; "
                            f"{time.time() - t0:.0f} s"))
    del merged
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "scripts" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
              *(["--cpu", "--mixed_precision", "no"] if args.cpu else [])]
    fsdp = out / "lora_fsdp"
    run([*launch, *train[1:], "--out", str(fsdp), "--max-steps", "2", "--save-every", "2"], out / "fsdp_save.log")
    (fsdp / "train_config.json").unlink()   # as if the run was killed after its step-2 checkpoint
    shards = sorted(p.name for p in (fsdp / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file())
    run([*launch, *train[1:], "--out", str(fsdp), "--max-steps", "4", "--save-every", "2", "--resume"],
        out / "fsdp_resume.log")
    resumed = "resumed from" in (out / "fsdp_resume.log").read_text()
    cfg = json.loads((fsdp / "train_config.json").read_text())
    rows.append(("4 FSDP save+resume", f"sharding {cfg['sharding']}, checkpoint-2 holds {len(shards)} files "
                 f"({', '.join(shards[:3])}...); {'resumed' if resumed else 'NOT resumed'} to step "
                 f"{cfg['optimizer_steps']}"))
    rows.append(train_row("4 FSDP resumed run", fsdp))   # the sharded estimate against the measured peak
    return rows


def two_model(args, out, mid):
    """Step 5: the adapter from step 3 as the specialist over its base model, 2 episodes."""
    run([sys.executable, "eval.py", "--env", "crafter", "--scaffold", "v0", "--model", str(mid), "--specialist",
         str(out / "lora_bf16"), "--episodes", "2", "--max-steps", str(args.steps), "--max-new-tokens",
         str(args.max_new_tokens), "--out", str(out / "two_model_run")], out / "two_model.log")
    import eval as ev
    roles = {"base": 0, "specialist": 0}
    for seed in (42, 43):
        for record in ev.read_trace(ev.episode_paths(out / "two_model_run", "crafter", "default", seed)[0]):
            for _, routine in ev.routines(record):
                for turn in routine["turns"]:
                    roles[turn["role"]] += 1
    return [("5 two-model eval", f"2 episodes finished; {roles['specialist']} specialist turns (adapter on), "
                                 f"{roles['base']} base turns (adapter off)")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the logs, results.json and table.md")
    p.add_argument("--cpu", action="store_true", help="no GPU: every step a CPU can run, at toy sizes")
    p.add_argument("--steps", type=int, default=None, help="game steps per episode (default 3, 1 with --cpu)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default 32, 8 with --cpu)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.cpu else 3)
    args.max_new_tokens = args.max_new_tokens or (8 if args.cpu else 32)
    if not args.cpu and not torch.cuda.is_available():
        p.exit(2, "gpu_check.py: error: no CUDA GPU here; run with --cpu for the steps a CPU can run\n")
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    mid = random_model(out / "qwen1.5b-random", {**QWEN_1_5B, **(TOY if args.cpu else {})}, dtype)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (toy sizes)"
    steps = [("1", lambda: hf_eval(args, out, [("tiny-random", agent.tiny_random_path()), ("Qwen2.5-1.5B-shaped", mid)])),
             ("2", lambda: plan_32b(args, out)), ("3-4", lambda: loop2(args, out, mid)),
             ("5", lambda: two_model(args, out, mid))]
    rows, failed, t_start, commit = [], 0, time.time(), agent_commit()   # the commit the steps ran
    for name, step in steps:
        t0 = time.time()
        try:
            got = step()
        except Exception as e:
            failed += 1
            got = [(f"{name} FAILED", f"{type(e).__name__}: {str(e)[:200]}")]
            (out / f"step{name}_traceback.txt").write_text(traceback.format_exc())
        peak_reset()   # a failed step's GPU memory goes back before the next step's processes start
        for k, v in got:   # as it comes (stderr): a run stopped at its time limit still shows its rows
            rows.append((k, v, f"{time.time() - t0:.0f}"))
            print(f"gpu_check: {k}: {v}", file=sys.stderr, flush=True)
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate")}
    head = (f"GPU check on {device}, commit {commit}, {time.strftime('%Y-%m-%d')}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {time.time() - t_start:.0f} s in all")
    table = [head, "", "| step | result | s |", "|---|---|---|", *(f"| {k} | {v} | {s} |" for k, v, s in rows)]
    (out / "table.md").write_text("\n".join(table) + "\n")
    (out / "results.json").write_text(json.dumps({"device": device, "versions": versions, "rows": rows}, indent=1))
    print("\n".join(table))
    return 1 if failed else 0


def agent_commit():
    """HEAD's short hash; "unknown" where the tree is a copy without git (a lent machine's may be)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
