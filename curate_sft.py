"""Loop #2 data and decisions: select the agent's own good memory turns, verbatim, as SFT data for
a LoRA memory specialist; decide each iteration's data and LoRA configs from the ledger.

    python curate_sft.py --run runs/crafter_train --scaffold v3 --out sft/crafter_v3
        [--meta-model NAME --meta-base-url URL | --judge heuristic] [--min-examples 300]
        [--top-pct 100] [--report-seeds 42-51] [--allow-report-seeds]
    python curate_sft.py seeds --n 100 [--skip 0]        # the authors' training-seed draw
    python curate_sft.py check-seeds --env crafter --train S --val S [--report S] [--run R ...]
    python curate_sft.py iterate --run R --ledger sft/ledger.jsonl --out sft/iter2 [...]
    python curate_sft.py record --ledger L --sft sft/iter2 --recipe sft/iter2/recipe_1.json \\
        --adapter adapters/iter2_recipe_1 --run runs/val_iter2_recipe_1 [--baseline runs/val_base]
    python curate_sft.py recorded --ledger L --adapter A # exit 0 when the ledger has a row for A
    python curate_sft.py best --ledger L                 # the adapter of the best ledger row

Curation. Candidates are every LOG routine and every PLAN consultation in the traces, as the exact
messages the model saw and wrote. Each goes through the paper's six deterministic transforms; a
judge (the meta-LLM, shown whole examples, or the documented heuristic) keeps or drops the
survivors with a reason; the validity checks run on every kept item (a violation stops the
command). Runs holding episodes on the report seeds (the paper's, or --report-seeds) are refused:
a specialist trained on them would be scored on its own training worlds. `check-seeds` refuses
overlapping training / validation / report seeds and runs holding validation or report episodes.
Outputs in --out: train.jsonl, review_decisions.jsonl, selection_stats.json, selection_logic.md,
recipe.json (the authors' prior).

Iterations (the authors' training engine). `iterate` reads the ledger (per trained config: the
recipe, the data, the loss curve, progression per task on validation seeds) and decides jointly:
reuse the last data or regenerate it with new size knobs, and one or two LoRA configs
(recipe_1.json, recipe_2.json). The meta-LLM decides; without one, a two-iteration schedule does
(heuristic_decision: the authors' prior, then its learning rate halved and doubled).
"""
import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import agent as agent_mod
import eval as ev
from memory_fs import ARITY, cut_after_last_terminator, parse_ops

FOLLOW_STEPS = 10          # "progress in the following steps" looks this far ahead
TARGETS = ("ALL", "ATTN", "QV", "MLP")
RECIPE_KEYS = ("rank", "alpha", "dropout", "lr", "epochs", "batch", "grad_accum", "cutoff",
               "scheduler", "warmup", "target")
INT_KEYS = ("rank", "alpha", "epochs", "batch", "grad_accum", "cutoff")
# The authors' priors (specs/automem_reference.md section 4). Here batch x grad_accum is the global
# batch at any GPU count (train_lora.py); the authors' b x ga was per GPU, on 2 GPUs (crafter
# 2 x 8 x 2 = 32 examples per step), so grad_accum is their ga x 2.
SHARED_PRIOR = {"dropout": 0.0, "lr": 5e-5, "batch": 2, "cutoff": 16384, "scheduler": "cosine", "warmup": 0.05}
PRIORS = {"crafter": {**SHARED_PRIOR, "rank": 256, "alpha": 512, "epochs": 4, "grad_accum": 16, "target": "ATTN"},
          "minihack": {**SHARED_PRIOR, "rank": 128, "alpha": 256, "epochs": 3, "grad_accum": 8, "target": "ALL"},
          "nle": {**SHARED_PRIOR, "rank": 256, "alpha": 512, "epochs": 1, "grad_accum": 16, "target": "ALL"}}
DATA_MINIMUM = {"crafter": 600, "minihack": 300, "nle": 800}
SEED_RANGE = (ev.TRAIN_SEEDS_START, 99999)   # the authors' training seeds: random.seed(999), randint(1000, 99999)
ACTION_ONLY_CHARS = 200         # transform 3: a PLAN item with no memory op and less text is dropped
JUDGE_BATCH_CHARS = 120_000     # whole examples per meta-LLM judge call, about 30k tokens
PRINCIPLES = """Selection principles (keep a turn only if it is a good example to imitate):
1. Retrieve before writing: SEARCH / READ the target before adding to it.
2. No duplicate records: never write what memory already holds.
3. Records are accurate and attributable: what is written is what the observation shows, tied to
   the action that caused it.
4. Consultation bears on the action: PLAN lookups concern the situation at hand."""
FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)


def check_recipe(r):
    """The recipe, checked; raises ValueError naming the bad field."""
    if not isinstance(r, dict):
        raise ValueError("a recipe is a JSON object")
    missing = [k for k in RECIPE_KEYS if k not in r]
    if missing:
        raise ValueError(f"recipe misses {missing}")
    for k in INT_KEYS:
        if not isinstance(r[k], int) or r[k] < 1:
            raise ValueError(f"recipe {k} must be a positive integer")
    if not (0 <= float(r["dropout"]) < 1 and 0 < float(r["lr"]) < 1 and 0 <= float(r["warmup"]) < 1):
        raise ValueError("recipe dropout, lr and warmup must lie in [0, 1)")
    if r["target"] not in TARGETS:
        raise ValueError(f"recipe target must be one of {TARGETS}")
    if r["scheduler"] not in ("cosine", "linear", "constant", "constant_with_warmup"):
        raise ValueError("recipe scheduler must be cosine, linear, constant or constant_with_warmup")
    return {k: r[k] for k in RECIPE_KEYS}


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

def report_seeds(env_name):
    """The seeds the paper reports on (eval.py's defaults)."""
    return set(ev.PAPER_SEEDS[env_name])


def training_seeds(n, skip=0):
    """The authors' draw: random.seed(999), then randint(1000, 99999) until n distinct seeds that
    are not report seeds. `skip` passes over the first draws, so that validation seeds taken after
    the training seeds are disjoint from them."""
    rng, exclude = random.Random(999), set().union(*map(set, ev.PAPER_SEEDS.values()))
    seeds = []
    while len(seeds) < skip + n:
        s = rng.randint(*SEED_RANGE)
        if s not in exclude and s not in seeds:
            seeds.append(s)
    return seeds[skip:]


def listed(items, most=6):
    return ", ".join(map(str, items[:most])) + (", ..." if len(items) > most else "")


def held_out_problem(runs, held):
    """A one-line refusal when a run holds finished episodes on held-out seeds (`held`: name ->
    seeds, None for the paper's report seeds of each game); None otherwise."""
    for run in runs:
        for name, seeds in held.items():
            hits = sorted({(e, s) for e, _, s in ev.finished_episodes(run)
                           if s in (report_seeds(e) if seeds is None else seeds)})
            if hits:
                return (f"{run} holds episodes on {name} seeds ({listed([f'{e} {s}' for e, s in hits])}): "
                        "a specialist trained on them is scored on its own training worlds; collect on "
                        "training seeds (curate_sft.py seeds)")
    return None


def overlap_problem(named):
    """A one-line refusal when two of the seed sets in `named` (name -> seeds) share seeds; None otherwise."""
    for a, b in itertools.combinations(named, 2):
        if common := sorted(set(named[a]) & set(named[b])):
            return f"the {a} and {b} seeds overlap ({listed(common)})"
    return None


# ---------------------------------------------------------------------------------------------
# Candidates and features
# ---------------------------------------------------------------------------------------------

def routine_messages(routine, turns):
    """The conversation of a routine up to the last of `turns`: every input as the model saw it,
    then that turn's reply as the model wrote it."""
    return routine["messages"][:turns[-1]["input_messages"]] + [{"role": "assistant", "content": turns[-1]["response"]}]


def consultation(turns):
    """The turns of one role from the start (in two-model mode the base model's hand-off turn is
    not a memory turn), up to the first failed one."""
    out = []
    for t in turns:
        if t.get("role", "base") != turns[0].get("role", "base") or t.get("error") or t.get("response") is None:
            break
        out.append(t)
    return out


def memory_turns(record):
    """(phase, routine, turns, ops) for each LOG routine and PLAN consultation of a step record that
    holds model output (a failed backend wrote nothing); `ops`: those of its turns, in order."""
    for phase, routine in ev.routines(record):
        turns = consultation(routine["turns"])
        if phase in ("log", "plan") and turns:
            yield phase, routine, turns, [op for t in turns for op in t.get("ops", [])]


def memory_ops(ops):
    """The well-formed ops among traced ones that read or write memory (a scaffold's own included)."""
    return [op for op in ops if not op.get("error") and ev.op_kind(op) in ("read", "write")]


@lru_cache(maxsize=4)
def _trace_by_step(run, env_name, task, seed):
    """A trace re-read from disk once (kept items of one episode come together), by step."""
    trace, _, _ = ev.episode_paths(run, env_name, task, seed)
    return {r["step"]: r for r in ev.read_trace(trace)}


def source_messages(run, meta):
    """The candidate's messages re-read from its trace file, for the verbatim check."""
    record = _trace_by_step(str(run), meta["env"], meta["task"], meta["seed"])[meta["step"]]
    routine = dict(ev.routines(record))[meta["phase"]]
    return routine_messages(routine, consultation(routine["turns"]))


def candidates(run):
    """Every LOG routine and PLAN consultation of a run, with deterministic features. Ops count by
    kind, so a scaffold's own ops (a map op, a note op) count as the reads or writes they are."""
    run = Path(run)
    out = []
    for env_name, task, seed in ev.finished_episodes(run):
        trace, _, _ = ev.episode_paths(run, env_name, task, seed)
        records = ev.read_trace(trace)
        final = records[-1]["progression"] if records else 0.0
        for t, r in enumerate(records):
            ahead = records[min(t + FOLLOW_STEPS, len(records) - 1)]
            for phase, routine, turns, ops in memory_turns(r):
                kinds = [ev.op_kind(op) for op in memory_ops(ops)]
                first_write = next((i for i, k in enumerate(kinds) if k == "write"), None)
                features = {
                    "ops": [op["op"] for op in ops if not op.get("error")],
                    "writes": kinds.count("write"),
                    "reads": kinds.count("read"),
                    "redundant_writes": sum("redundant" in op.get("flags", []) for op in ops),
                    "empty_searches": sum("empty" in op.get("flags", []) for op in ops),
                    "parse_errors": sum(bool(op.get("error")) for op in ops),
                    "retrieved_before_write": first_write is not None and "read" in kinds[:first_write],
                    "ended": routine.get("ended"),
                    "progress_after": ahead["progression"] - r["progression"],
                    "reward_after": sum(x["reward"] for x in records[t:t + FOLLOW_STEPS]),
                    "episode_progression": final,
                }
                meta = {"run": str(run), "env": env_name, "task": task, "seed": seed, "step": r["step"],
                        "phase": phase, "turns": len(turns), "role": turns[0].get("role", "base")}
                cid = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
                out.append({"id": cid, "meta": meta, "features": features, "messages": routine_messages(routine, turns),
                            "arity": {op["op"]: len(op["args"]) for op in ops
                                      if op["op"] not in ARITY and not op.get("error")}})
    return out


def valid_op_share(run):
    """How often the memory turns hold a valid memory op: of the LOG routines and the PLAN
    consultations (the specialist's turns in two-model runs), the share in which the model wrote
    at least one well-formed read or write op, by phase and over both."""
    hits, total = Counter(), Counter()
    for env_name, task, seed in ev.finished_episodes(run):
        for r in ev.iter_trace(ev.episode_paths(run, env_name, task, seed)[0]):
            for phase, _, _, ops in memory_turns(r):
                total[phase] += 1
                hits[phase] += bool(memory_ops(ops))
    share = {p: hits[p] / total[p] if total[p] else None for p in ("log", "plan")}
    n = sum(total.values())
    return {**share, "all": sum(hits.values()) / n if n else None, "routines": n}


# ---------------------------------------------------------------------------------------------
# The six deterministic transforms and the validity checks
# ---------------------------------------------------------------------------------------------

def unwrap_fences(text):
    """1. Code fences around op tags go; the ops stay."""
    return FENCE_RE.sub(lambda m: m.group(1) if parse_ops(m.group(1)).ops else m.group(0), text)


def _ops(text, arity):
    """The well-formed ops of a reply; `arity`: the scaffold's own ops, as traced."""
    return [op for op in parse_ops(text, arity=arity).ops if op.error is None]


def cut_after(text, name, arity):
    """`text` up to the end of its first well-formed `name` op (unchanged if it has none)."""
    op = next((op for op in _ops(text, arity) if op.name == name), None)
    return text if op is None else text[:text.index(op.raw) + len(op.raw)]


POSTPROCESSING = """1. unwrap code fences around op tags;
2. LOG items: cut after DONE;
3. PLAN items: drop action-only ones (no memory op and under 200 characters); cut at the ACTION:
   the consultation is kept and the item ends with the ACTION op (in two-model mode an ACTION
   hands over to the base model, which never sees it);
4. drop items with no memory op left, or whose last reply holds no op;
5. trim text after the last END or DONE;
6. drop items that still hold a code fence."""
CHECKS = ("roles alternate from user to assistant (after one system message); the last reply holds "
          "an op, DONE or ACTION; no code fence is left; every message is the trace's text, up to the "
          "transforms")


def _has_memory_op(replies, arity):
    return any(op.name not in ("DONE", "ACTION") for m in replies for op in _ops(m["content"], arity))


def transform(item):
    """The paper's six post-processing steps (POSTPROCESSING), in order, on one candidate;
    (item, None) or (None, why it is dropped)."""
    phase, arity = item["meta"]["phase"], item.get("arity", {})
    messages = [dict(m) for m in item["messages"]]
    replies = [m for m in messages if m["role"] == "assistant"]
    for m in replies:
        m["content"] = unwrap_fences(m["content"])                                           # 1
    if phase == "log":
        for m in replies:
            m["content"] = cut_after(m["content"], "DONE", arity)                               # 2
    else:
        if not _has_memory_op(replies, arity) and sum(len(m["content"]) for m in replies) < ACTION_ONLY_CHARS:
            return None, "PLAN item with no memory op, under 200 characters (action only)"     # 3
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and any(op.name == "ACTION" for op in _ops(m["content"], arity)):
                m["content"] = cut_after(m["content"], "ACTION", arity)
                messages = messages[:i + 1]
                replies = [x for x in messages if x["role"] == "assistant"]
                break
    if not _has_memory_op(replies, arity):                                                      # 4
        return None, "no memory op left"
    if not _ops(replies[-1]["content"], arity):
        return None, "the last reply holds no op"
    for m in replies:
        m["content"] = cut_after_last_terminator(m["content"]).strip()                      # 5
    if any("```" in m["content"] for m in replies):                                          # 6
        return None, "a code fence remains"
    return {**item, "messages": messages}, None


class ValidityError(Exception):
    pass


def check_item(item, source_messages):
    """The four checks after post-processing (CHECKS); a violation raises."""
    msgs = item["messages"]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body or body[-1]["role"] != "assistant":
        raise ValidityError(f"{item['id']}: the item must end with an assistant message")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValidityError(f"{item['id']}: roles do not alternate user/assistant at message {i}")
    if not _ops(body[-1]["content"], item.get("arity", {})):
        raise ValidityError(f"{item['id']}: the last reply holds no op, DONE or ACTION")
    if any("```" in m["content"] for m in body if m["role"] == "assistant"):
        raise ValidityError(f"{item['id']}: a reply still holds a code fence")
    redo, _ = transform({**item, "messages": source_messages})
    if redo is None or redo["messages"] != msgs:
        raise ValidityError(f"{item['id']}: text is not verbatim from the trace up to the transforms")


# ---------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------

HEURISTIC_RULE = """Heuristic judge (no meta-LLM): keep a candidate when
- it has no malformed op, no redundant write, and no empty SEARCH, and
- LOG: it writes at least once and read memory (any read op) before its first write;
  PLAN: it consults memory (at least one read op), and
- the episode's final progression is at least the median over the candidates' episodes, or
  progression grew within the following 10 steps.
Ops count by kind: a scaffold's own ops count as the reads or writes they are."""


def heuristic_judge(items):
    finals = sorted(c["features"]["episode_progression"] for c in items) or [0.0]
    median = finals[len(finals) // 2]
    decisions = []
    for c in items:
        f = c["features"]
        if f["parse_errors"] or f["redundant_writes"] or f["empty_searches"]:
            keep, why = False, "malformed op, redundant write or empty search"
        elif c["meta"]["phase"] == "log" and not (f["writes"] and f["retrieved_before_write"]):
            keep, why = False, "LOG that does not look before it writes"
        elif c["meta"]["phase"] == "plan" and not f["reads"]:
            keep, why = False, "PLAN without a memory consultation"
        elif f["episode_progression"] < median and f["progress_after"] <= 0:
            keep, why = False, "below-median episode and no progress after"
        else:
            keep, why = True, "clean memory use in a good stretch of play"
        decisions.append({"id": c["id"], "keep": keep, "reason": why})
    return decisions


def render_for_judge(c, systems):
    """A whole candidate as the specialist would learn it; the system prompt by reference."""
    head = (f"### candidate {c['id']} ({c['meta']['phase']}, step {c['meta']['step']}, episode progression "
            f"{c['features']['episode_progression']:.3f}, progress in the next {FOLLOW_STEPS} steps "
            f"{c['features']['progress_after']:.3f})\nfeatures: {json.dumps(c['features'])}")
    lines = [f"[system] (system prompt S{systems.index(m['content']) + 1})" if m["role"] == "system"
             else f"[{m['role']}]\n{m['content']}" for m in c["messages"]]
    return head + "\n" + "\n".join(lines)


def judge_prompt(chunk):
    systems = list(dict.fromkeys(m["content"] for c in chunk for m in c["messages"] if m["role"] == "system"))
    return (f"{PRINCIPLES}\n\nJudge each candidate memory turn below: whole conversations, exactly as "
            "the memory specialist would be trained on them (the last reply is the turn to imitate; "
            'check records against the observation). Answer with JSON only: {"decisions": [{"id": "...", '
            '"keep": true, "reason": "..."}, ...]} with one entry per candidate.\n\n'
            + "".join(f"## System prompt S{i + 1}\n{s}\n\n" for i, s in enumerate(systems))
            + "\n\n".join(render_for_judge(c, systems) for c in chunk))


def extract_json(text):
    """The first JSON object in a reply (models wrap it in prose or fences)."""
    text = text or ""
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[m.start():])
            return obj
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object in the reply")


def batches(items, budget=JUDGE_BATCH_CHARS):
    """Consecutive items in groups of at most `budget` characters of messages (at least one each)."""
    chunk, size = [], 0
    for c in items:
        n = sum(len(m["content"]) for m in c["messages"])
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(c)
        size += n
    if chunk:
        yield chunk


def ask_json(client, model, prompt):
    """The first JSON object in the meta-LLM's reply (ValueError when there is none); a request
    that fails after the client's retries raises EndpointError, in one line."""
    import openai
    try:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])
    except openai.APIError as e:
        raise agent_mod.meta_failure(client, model, e) from e
    return extract_json(r.choices[0].message.content)


def llm_judge(items, client, model, max_undecided_pct=10):
    """The meta-LLM's decisions. A batch with items its reply decides nothing about is asked again
    once; the items still undecided are marked so (dropped, never cached as judged), and more
    than `max_undecided_pct` % of them stops the command: a judge that cannot answer is no judge."""
    decisions, undecided, error = [], 0, None
    for chunk in batches(items):
        got = {}
        for _ in range(2):
            try:
                obj = ask_json(client, model, judge_prompt(chunk))
                got.update({str(d["id"]): d for d in obj.get("decisions", [])   # "keep": "no" is no decision
                            if isinstance(d, dict) and "id" in d and isinstance(d.get("keep"), bool)})
            except (ValueError, AttributeError, TypeError) as e:    # TypeError: "decisions": null
                error = f"{type(e).__name__}: {e}"
            if all(c["id"] in got for c in chunk):
                break
            error = error or "the reply decides nothing about some of the candidates"
        for c in chunk:
            d = got.get(c["id"])
            if d is None:
                undecided += 1
                decisions.append({"id": c["id"], "keep": False, "undecided": True,
                                  "reason": f"judge gave no decision ({error})"})
            else:
                decisions.append({"id": c["id"], "keep": bool(d.get("keep")), "reason": str(d.get("reason", ""))})
    if items and 100 * undecided / len(items) > max_undecided_pct:
        raise SystemExit(f"curate_sft.py: the judge {model} gave no decision for {undecided} of {len(items)} "
                         f"candidates, asked twice (more than --max-undecided-pct {max_undecided_pct:g}); last "
                         f"problem: {error}. Nothing written")
    return decisions


# ---------------------------------------------------------------------------------------------
# Curation
# ---------------------------------------------------------------------------------------------

def curate(runs, out, judge="heuristic", client=None, meta_model=None, top_pct=100, min_examples=300,
           scaffold=None, judged=None, max_undecided_pct=10):
    """Candidates -> six transforms -> judge -> checks -> the top `top_pct` % -> files in `out`.
    `judged` (id -> earlier verdict of the same judge) spares the meta-LLM a second look."""
    out = Path(out)
    items = [{**c, "source": run} for run in runs for c in candidates(run)]
    if not items:
        raise SystemExit("curate_sft.py: the runs hold no LOG or PLAN turns")
    verdict = {}
    survivors = []
    for c in items:
        item, why = transform(c)
        if item is None:
            verdict[c["id"]] = {"keep": False, "reason": f"post-processing: {why}", "judge": None}
        else:
            survivors.append(item)
    judged = judged or {}
    fresh = [c for c in survivors if c["id"] not in judged]
    decisions = (llm_judge(fresh, client, meta_model, max_undecided_pct) if judge == "llm"
                 else heuristic_judge(fresh))
    undecided = {d["id"] for d in decisions if d.get("undecided")}
    judged = {**judged, **{d["id"]: {"keep": d["keep"], "reason": d["reason"]} for d in decisions}}
    kept = []
    for c in survivors:
        j = judged[c["id"]]
        verdict[c["id"]] = {**j, "judge": None if c["id"] in undecided else j}
        if j["keep"]:
            check_item(c, source_messages(c["source"], c["meta"]))
            kept.append(c)
    kept.sort(key=lambda c: (-c["features"]["episode_progression"], -c["features"]["progress_after"], c["id"]))
    cut = kept[:max(1, round(len(kept) * top_pct / 100))] if kept else []
    for c in kept[len(cut):]:
        verdict[c["id"]].update(keep=False, reason=f"outside the top {top_pct}%")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for c in cut:
            f.write(json.dumps({"messages": c["messages"], "meta": {**c["meta"], "id": c["id"],
                                                                   "features": c["features"]}}) + "\n")
    with open(out / "review_decisions.jsonl", "w") as f:
        for c in items:
            f.write(json.dumps({"id": c["id"], **verdict[c["id"]], "meta": c["meta"], "features": c["features"]}) + "\n")
    env_name = sorted({c["meta"]["env"] for c in items})[0]
    stats = {"candidates": len(items), "kept": len(cut), "judge": judge, "top_pct": top_pct, "undecided": len(undecided),
             "by_phase": {p: sum(c["meta"]["phase"] == p for c in cut) for p in ("log", "plan")},
             "candidates_by_phase": {p: sum(c["meta"]["phase"] == p for c in items) for p in ("log", "plan")},
             "by_episode": dict(Counter(f"{c['meta']['run']}/{c['meta']['env']}/{c['meta']['task']}/"
                                        f"{c['meta']['seed']}" for c in cut)),
             "dropped_by_reason": Counter(v["reason"] for v in verdict.values() if not v["keep"]),
             "min_examples": min_examples, "below_minimum": len(cut) < min_examples, "env": env_name}
    ev.write_json(out / "selection_stats.json", stats)
    recipe = {**check_recipe(PRIORS[env_name]), "chosen_by": "prior", "reason": f"the authors' {env_name} prior",
              "env": env_name, "data_size": len(cut), "scaffold": scaffold}
    ev.write_json(out / "recipe.json", recipe)
    judge_text = HEURISTIC_RULE if judge == "heuristic" else (
        f"Meta-LLM judge ({meta_model}), shown whole examples (batches of about {JUDGE_BATCH_CHARS:,} "
        f"characters) and each candidate's features, with these principles:\n\n{PRINCIPLES}")
    (out / "selection_logic.md").write_text(
        f"# Selection logic\n\nRuns: {', '.join(map(str, runs))}; scaffold {scaffold}.\n\n"
        f"Candidates: every LOG routine and PLAN consultation ({len(items)}).\n\n"
        f"Post-processing, in order, before judging:\n{POSTPROCESSING}\n\n"
        f"{judge_text}\n\nChecks on every kept item: {CHECKS}.\n\n"
        f"Kept {len(cut)} (top {top_pct}% by episode progression, then progress in the following "
        f"{FOLLOW_STEPS} steps).\n")
    if stats["below_minimum"]:
        print(f"warning: {len(cut)} examples, below --min-examples {min_examples} "
              f"(the authors used at least {DATA_MINIMUM[env_name]} for {env_name})", file=sys.stderr)
    print(f"kept {len(cut)} of {len(items)} candidates -> {out}/train.jsonl")
    return stats


# ---------------------------------------------------------------------------------------------
# The ledger and the training engine
# ---------------------------------------------------------------------------------------------

def read_ledger(path):
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progression_by_task(run):
    s = ev.summarize(run)
    return {e: {"mean": v["progression_pct"]["mean"], "stderr": v["progression_pct"]["stderr"],
                "n": v["progression_pct"]["n"], "tasks": {t: g["progression_pct"]["mean"] for t, g in v["tasks"].items()}}
            for e, v in s["envs"].items()}


def record(ledger, sft, recipe, adapter, run, baseline=None):
    """Append one ledger row: what a specialist was trained on and how, and how it played."""
    sft, adapter = Path(sft), Path(adapter)
    decision = json.loads((sft / "decision.json").read_text()) if (sft / "decision.json").exists() else {}
    stats = json.loads((sft / "selection_stats.json").read_text())
    losses = json.loads((adapter / "loss.json").read_text())
    every = max(1, len(losses) // 12)
    row = {"iteration": decision.get("iteration"), "config": Path(recipe).stem, "sft": str(sft),
           "adapter": str(adapter), "run": str(run),
           "recipe": check_recipe(json.loads(Path(recipe).read_text())),
           "data": {"size": stats["kept"], "by_phase": stats["by_phase"], "top_pct": stats["top_pct"],
                    "candidates": stats["candidates"], "reused_from": decision.get("reused_from")},
           "loss": {"first": losses[0]["loss"], "final": losses[-1]["loss"], "steps": len(losses),
                    "curve": [[x["step"], round(x["loss"], 4)] for x in losses[::every]]},
           "progression_pct": progression_by_task(run), "valid_op_share": valid_op_share(run),
           "baseline_progression_pct": progression_by_task(baseline) if baseline else None}
    Path(ledger).parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"ledger {ledger}: {row['config']} of iteration {row['iteration']}: progression "
          + ", ".join(f"{e} {v['mean']:.2f}%" for e, v in row["progression_pct"].items()))
    return row


def overall(row):
    """A ledger row's score: mean progression over its games."""
    vals = [v["mean"] for v in row["progression_pct"].values() if v["mean"] is not None]
    return sum(vals) / len(vals) if vals else float("-inf")


def batch_problem(config, processes):
    """Why `config`'s global batch cannot run on `processes` training processes, or None: the one
    rule both the training engine's decisions and train_lora.py's batch_plan apply."""
    total = config["batch"] * config["grad_accum"]
    if total % processes:
        return (f"the global batch of {total} examples (batch x grad_accum) does not split evenly over "
                f"{processes} processes")
    return None


def heuristic_decision(env_name, iteration, processes=1, meta_error=None):
    """Without a meta-LLM: iteration 1 trains the authors' prior on all the judged data; iteration
    2 reuses that data with the learning rate halved and doubled, the knob LoRA SFT is most
    sensitive to (the authors' engine varies the configs and the data; the data knobs only shrink
    it, and the judged data is already what the heuristic judge keeps). loop2.sh picks the best of
    the three; there is nothing sane left to vary after that, so a third iteration is refused.
    `meta_error`: the meta-LLM's answers were unusable, and this is the fallback."""
    why = f"meta-LLM decision unusable twice ({meta_error}); " if meta_error else ""
    prior = check_recipe(PRIORS[env_name])
    if iteration == 1:
        decision = {"data": "regenerate", "top_pct": 100, "min_examples": DATA_MINIMUM[env_name], "configs": [prior],
                    "reason": f"{why}no meta-LLM: iteration 1 trains the authors' {env_name} prior on all the "
                              "judged examples"}
    elif iteration == 2:
        decision = {"data": "reuse", "configs": [{**prior, "lr": prior["lr"] / 2}, {**prior, "lr": prior["lr"] * 2}],
                    "reason": f"{why}no meta-LLM: iteration 2 reuses the data with the prior's learning rate "
                              "halved and doubled"}
    elif meta_error:
        raise SystemExit(f"curate_sft.py: the meta-LLM's decision for iteration {iteration} was unusable twice "
                         f"({meta_error}), and the heuristic engine it falls back to has only 2 iterations: "
                         "nothing written; a rerun asks the meta-LLM again")
    else:
        raise SystemExit(f"curate_sft.py: the heuristic training engine has 2 iterations (the prior, then its "
                         f"learning rate halved and doubled); iteration {iteration} needs the meta-LLM "
                         "(--meta-base-url)")
    if problem := batch_problem(prior, processes):
        raise SystemExit(f"curate_sft.py: {why}the heuristic engine trains the authors' {env_name} prior, and {problem}")
    return {**decision, "chosen_by": "heuristic"}


def engine_prompt(env_name, iteration, ledger, last_data, processes=1):
    prior = (f"The authors' prior for {env_name} (given at iteration 1 only): {json.dumps(check_recipe(PRIORS[env_name]))}, "
             f"with at least {DATA_MINIMUM[env_name]} examples.\n" if iteration == 1 else "")
    data = "No data yet: this iteration must regenerate it.\n"
    if last_data:
        stats = json.loads((last_data / "selection_stats.json").read_text())
        examples = [json.loads(x) for x in (last_data / "train.jsonl").read_text().splitlines()[:2]]
        data = (f"The last data ({last_data}): {json.dumps({k: stats[k] for k in ('candidates', 'kept', 'top_pct', 'by_phase', 'dropped_by_reason')})}\n"
                "Two of its examples, whole:\n" + "\n".join(json.dumps(e["messages"]) for e in examples) + "\n")
    return (f"You are the training engine of AutoMem's loop #2: LoRA SFT of a memory specialist for "
            f"{env_name} on the agent's own curated memory turns. Decide iteration {iteration}, jointly:\n"
            "- data: \"reuse\" the last iteration's data, or \"regenerate\" it from the same traces with the "
            "size knobs top_pct (keep the top X% of the judged examples by episode progression, 0-100] and "
            "min_examples (the size you want; a warning below it);\n"
            f"- configs: one or two LoRA configs, each an object with keys {list(RECIPE_KEYS)}; target is "
            f"one of {list(TARGETS)}, scheduler cosine, linear, constant or constant_with_warmup; batch x "
            "grad_accum is the global batch (examples per optimizer step, whatever the GPU count). Training "
            f"runs on {processes} process(es), one per GPU: the global batch must be a multiple of {processes}.\n"
            f"{prior}{data}"
            "The ledger (one row per trained config: recipe, data, loss curve as [step, loss], progression "
            "% per game and task on validation seeds, the base model's progression on the same seeds, and "
            "the share of memory turns with a valid memory op):\n"
            + ("\n".join(json.dumps(r) for r in ledger) or "(empty)") +
            '\nAnswer with JSON only: {"data": "reuse" | "regenerate", "top_pct": ..., "min_examples": ..., '
            '"configs": [{...}, ...], "reason": "..."}')


def checked_decision(d, env_name, last_data, processes):
    """The meta-LLM's decision `d`, checked; raises ValueError saying what is wrong."""
    if d.get("data") not in ("reuse", "regenerate") or (d["data"] == "reuse" and not last_data):
        raise ValueError("data must be reuse (when there is data) or regenerate")
    if not 0 < float(d.get("top_pct", 100)) <= 100 or int(d.get("min_examples", 1)) < 1:
        raise ValueError("top_pct must lie in (0, 100] and min_examples be positive")
    configs = d.get("configs")
    if not isinstance(configs, list) or not 1 <= len(configs) <= 2:
        raise ValueError("configs must hold one or two recipes")
    configs = [check_recipe(c) for c in configs]
    if problem := next(filter(None, (batch_problem(c, processes) for c in configs)), None):
        raise ValueError(problem)
    return {"data": d["data"], "top_pct": float(d.get("top_pct", 100)),
            "min_examples": int(d.get("min_examples", DATA_MINIMUM[env_name])),
            "configs": configs, "chosen_by": "meta-llm", "reason": str(d.get("reason", ""))}


def decide(env_name, iteration, ledger, last_data, client=None, model=None, processes=1):
    """The next iteration's data and configs for `processes` training processes: the meta-LLM's,
    checked (an unusable answer is asked for again once, saying why), or the heuristic's."""
    if client is None:
        return heuristic_decision(env_name, iteration, processes)
    prompt, error = engine_prompt(env_name, iteration, ledger, last_data, processes), None
    for _ in range(2):
        try:
            return checked_decision(ask_json(client, model, prompt), env_name, last_data, processes)
        except (ValueError, AttributeError, TypeError, KeyError) as e:
            error = f"{type(e).__name__}: {e}"
            prompt = f"{prompt}\nYour previous answer was unusable ({error}); answer again."
    return heuristic_decision(env_name, iteration, processes, meta_error=error)


def iterate(args, client):
    """One iteration's data and configs in --out: decision.json, train.jsonl (+ curation files), recipe_N.json."""
    out = Path(args.out)
    ledger = read_ledger(args.ledger)
    iteration = 1 + len({r["iteration"] for r in ledger})
    episodes = [e for run in args.run for e in ev.finished_episodes(run)]
    if not episodes:
        raise SystemExit("curate_sft.py: the runs hold no finished episode")
    env_name = episodes[0][0]
    last_data = Path(ledger[-1]["sft"]) if ledger else None
    decision = {"iteration": iteration, **decide(env_name, iteration, ledger, last_data, client, args.meta_model,
                                                   args.processes)}
    if decision["data"] == "reuse":
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "review_decisions.jsonl", "selection_stats.json", "selection_logic.md"):
            shutil.copyfile(last_data / name, out / name)
        decision["reused_from"] = str(last_data)
    else:
        judged = {}    # earlier verdicts of the same judge: the meta-LLM is not asked twice
        for folder in dict.fromkeys(Path(r["sft"]) for r in ledger):
            if json.loads((folder / "selection_stats.json").read_text())["judge"] == args.judge:
                for d in map(json.loads, (folder / "review_decisions.jsonl").read_text().splitlines()):
                    if d.get("judge"):
                        judged[d["id"]] = d["judge"]
        curate(args.run, out, args.judge, client, args.meta_model, decision["top_pct"],
               decision["min_examples"], args.scaffold, judged, args.max_undecided_pct)
    n = json.loads((out / "selection_stats.json").read_text())["kept"]
    if n == 0:
        raise SystemExit(f"curate_sft.py: the data in {out} holds no example (selection_stats.json says why "
                         "each candidate was dropped): no recipe written")
    for i, config in enumerate(decision["configs"], 1):
        ev.write_json(out / f"recipe_{i}.json", {**config, "chosen_by": decision["chosen_by"],
                                                 "reason": decision["reason"], "env": env_name,
                                                 "data_size": n, "scaffold": args.scaffold})
    ev.write_json(out / "decision.json", decision)
    print(f"iteration {iteration}: {decision['data']} data ({n} examples), {len(decision['configs'])} "
          f"config(s), by {decision['chosen_by']}: {decision['reason']}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def add_curation_arguments(p):
    p.add_argument("--run", action="append", default=[], help="a run folder (repeatable)")
    p.add_argument("--scaffold", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--judge", default=None, choices=("llm", "heuristic"))
    p.add_argument("--meta-model", default=os.environ.get("META_MODEL", "gpt-5"))
    p.add_argument("--meta-base-url", default=os.environ.get("META_BASE_URL"))
    p.add_argument("--report-seeds", default=None, help="e.g. 42-51 (default: the paper's, per game)")
    p.add_argument("--allow-report-seeds", action="store_true",
                   help="curate from episodes on the report seeds anyway")
    p.add_argument("--max-undecided-pct", type=float, default=10,
                   help="the llm judge fails the command when it decides nothing about more candidates than this")


def check_curation_args(args):
    if not args.run:
        raise ev.UsageError("give at least one --run")
    if problem := ev.not_a_run(args.run):
        raise ev.UsageError(problem)
    report = ev.parse_seeds(args.report_seeds) if args.report_seeds else None
    if not args.allow_report_seeds and (problem := held_out_problem(args.run, {"report": report})):
        raise ev.UsageError(f"{problem} or pass --allow-report-seeds")
    if args.judge is None:
        args.judge = "llm" if args.meta_base_url else "heuristic"
    if args.judge == "llm" and not args.meta_base_url:
        raise ev.UsageError("the llm judge needs --meta-base-url (or use --judge heuristic)")
    if not args.meta_base_url:
        return None
    client = agent_mod.meta_client(args.meta_base_url)
    try:
        agent_mod.require_models(client, args.meta_base_url, [args.meta_model], "--meta-model", key_var="META_API_KEY")
    except agent_mod.EndpointError as e:
        raise agent_mod.EndpointError(f"the meta-LLM {args.meta_model}: {e}")
    return client


def curate_command(args):
    client = check_curation_args(args)
    if not 0 < args.top_pct <= 100:
        raise ev.UsageError("--top-pct must lie in (0, 100]")
    curate(args.run, args.out, args.judge, client, args.meta_model, args.top_pct, args.min_examples, args.scaffold,
           max_undecided_pct=args.max_undecided_pct)
    return 0


def iterate_command(args):
    if args.processes < 1:
        raise ev.UsageError("--processes must be positive")
    return iterate(args, check_curation_args(args))


def seeds_command(args):
    if args.n < 1 or args.skip < 0:
        raise ev.UsageError("--n must be at least 1 and --skip at least 0")
    print(",".join(map(str, training_seeds(args.n, args.skip))))
    return 0


def check_seeds_command(args):
    report = ev.parse_seeds(args.report) if args.report else list(ev.PAPER_SEEDS[args.env])
    val = ev.parse_seeds(args.val)
    problem = (overlap_problem({"training": ev.parse_seeds(args.train), "validation": val, "report": report})
               or held_out_problem(args.run, {"validation": val, "report": report}))
    if problem:
        raise ev.UsageError(problem)
    return 0


def record_command(args):
    if problem := ev.not_a_run([args.run] + ([args.baseline] if args.baseline else [])):
        raise ev.UsageError(problem)
    record(args.ledger, args.sft, args.recipe, args.adapter, args.run, args.baseline)
    return 0


def recorded_command(args):
    return 0 if any(r["adapter"] == str(Path(args.adapter)) for r in read_ledger(args.ledger)) else 1


def best_command(args):
    rows = read_ledger(args.ledger)
    if not rows:
        raise ev.UsageError("the ledger is empty")
    print(max(rows, key=overall)["adapter"])
    return 0


COMMANDS = {"curate": curate_command, "iterate": iterate_command, "seeds": seeds_command,
            "check-seeds": check_seeds_command, "record": record_command, "recorded": recorded_command,
            "best": best_command}


def build_parser():
    """curate_sft.py's command line; `curate` when no subcommand is named."""
    p = ev.DefaultCommandParser(prog="curate_sft.py", default_command="curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="subcommands (`curate_sft.py SUBCOMMAND --help` shows its options)")
    curate_p = sub.add_parser("curate", help="runs' memory turns -> SFT data (the default: `curate_sft.py --run R "
                                             "...` is `curate_sft.py curate --run R ...`)")
    add_curation_arguments(curate_p)
    curate_p.add_argument("--min-examples", type=int, default=300)
    curate_p.add_argument("--top-pct", type=float, default=100)
    iterate_p = sub.add_parser("iterate", help="the training engine: the next iteration's data and LoRA configs")
    add_curation_arguments(iterate_p)
    iterate_p.add_argument("--ledger", required=True)
    iterate_p.add_argument("--processes", type=int, default=1,
                           help="training processes (GPUs): every config's global batch must split over them")
    seeds_p = sub.add_parser("seeds", help="the authors' training-seed draw")
    seeds_p.add_argument("--n", type=int, default=100)
    seeds_p.add_argument("--skip", type=int, default=0)
    check_p = sub.add_parser("check-seeds", help="exit 2 (one line) when the seed sets overlap or a run holds "
                                                 "episodes on validation or report seeds")
    check_p.add_argument("--env", required=True, choices=sorted(ev.PAPER_SEEDS))
    check_p.add_argument("--train", required=True)
    check_p.add_argument("--val", required=True)
    check_p.add_argument("--report", default=None, help="default: the paper's")
    check_p.add_argument("--run", action="append", default=[])
    record_p = sub.add_parser("record", help="append a trained config's row to the ledger")
    for flag in ("--ledger", "--sft", "--recipe", "--adapter", "--run"):
        record_p.add_argument(flag, required=True)
    record_p.add_argument("--baseline", default=None, help="the base model's run on the same seeds")
    recorded_p = sub.add_parser("recorded", help="exit 0 when the ledger holds a row for the adapter, else 1")
    recorded_p.add_argument("--ledger", required=True)
    recorded_p.add_argument("--adapter", required=True)
    best_p = sub.add_parser("best", help="the adapter of the best ledger row")
    best_p.add_argument("--ledger", required=True)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ev.UsageError as e:
        p.exit(2, f"curate_sft.py {args.command}: error: {e}\n")
    except ValidityError as e:
        print(f"curate_sft.py: validity check failed, nothing more written: {e}", file=sys.stderr)
        return 1
    except agent_mod.EndpointError as e:      # the meta-LLM's server: one line, in its own words
        print(f"curate_sft.py {args.command}: {e}; nothing more written", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
