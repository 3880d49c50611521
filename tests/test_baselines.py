"""BALROG's baselines (naive, cot, robust_naive, robust_cot) exactly as BALROG builds and reads
them (specs/balrog_agents_protocol.md sections 1-2): the requests a real HTTP server receives on
the real games, the extraction of actions from tricky replies, the invalid-action feedback, and
the sampling parameters sent."""
import json
import shutil

import pytest
import torch

import envs
from agent import (BALROG_INSTRUCTIONS, ROBUST_COT_FAILURE, HFBackend, HistoryPrompt, OpenAIBackend, accepted,
                   balrog_output, make_agent, play, run_episodes, tiny_random_path)
from scripted_server import ScriptedServer

NAIVE, COT = BALROG_INSTRUCTIONS["naive"], BALROG_INSTRUCTIONS["cot"]


def feedback(default):
    return f"\n\nYour previous output did not contain a valid action. Defaulted to action: {default}\n\nObservation:\n"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def play_scripted(env_name, kind, replies, seed=42, **backend_kwargs):
    """Plays len(replies) steps, the model answering `replies` in order; returns the request
    bodies the server received, the trace records, and the observations (split) of every step,
    rebuilt on a fresh game from the executed actions."""
    answers = iter(replies)
    with ScriptedServer(lambda body: next(answers)) as server:
        env = envs.make_env(env_name, seed=seed)
        records = []
        backend = OpenAIBackend(server.url, "m", max_retries=0, **backend_kwargs)
        run_episodes([play(env, make_agent(kind, env), seed, records.append, len(replies))], backend)
        bodies = list(server.requests)
    env = envs.make_env(env_name, seed=seed)
    obs, seen = env.reset(seed=seed), []
    for r in records:
        assert obs["text"] == r["observation"]
        seen.append(obs)
        obs, *_ = env.step(r["action"]["executed"])
    return bodies, records, [o["long_term_context"] for o in seen], [o["short_term_context"] for o in seen]


CRAFTER_NAIVE = ["Move West.", "Do", "move north", "**Move East**", "Move North"] + \
    ["Move South", "Do", "Noop", "Move West", "Move North", "Do", "Move East",
     "I will go west", "Move South", "Do", "Noop", "Move West", "Move North", "Do", "Move East", "Do"]
NLE_NAIVE = ["west", "search.", "North", "(east)", "far west"] + \
    ["north", "south", "search", "esc", "west", "east", "north", "Search", "south", "west",
     "search", "east", "north", "esc", "south", "west"]
CASES = {  # replies, the first five outputs as read off them, the game's default action
    "crafter": (CRAFTER_NAIVE, ["Move West", "Do", "move north", "Move East", "Move North"], "Noop"),
    "nle": (NLE_NAIVE, ["west", "search", "North", "east", "far west"], "esc"),
}


@pytest.mark.parametrize("env_name", ["crafter", "nle"])
def test_naive_requests_at_steps_1_5_20(env_name):
    replies, first, default = CASES[env_name]
    bodies, records, L, S = play_scripted(env_name, "naive", replies)
    out = [r["action"]["raw"] for r in records]
    assert out[:5] == first
    # outputs 2 and 12 are not action names (case, extra words): the default ran and the next
    # observation's long-term context says so, in the history too
    assert [i for i, r in enumerate(records) if not r["action"]["valid"]] == [2, 12]
    assert {records[i]["action"]["executed"] for i in (2, 12)} == {default}
    L[3], L[13] = feedback(default) + L[3], feedback(default) + L[13]
    env = envs.make_env(env_name, seed=42)

    assert bodies[1]["messages"] == [
        user(env.instruction),
        user("Observation:\n" + L[0]), assistant(out[0]),
        user("Current Observation:\n" + S[1] + "\n" + L[1] + "\n\n" + NAIVE)]
    assert bodies[5]["messages"] == [
        user(env.instruction),
        user("Observation:\n" + L[0]), assistant(out[0]),
        user("Observation:\n" + L[1]), assistant(out[1]),
        user("Observation:\n" + L[2]), assistant(out[2]),          # the invalid output, as given
        user("Observation:\n" + L[3]), assistant(out[3]),          # told it was invalid
        user("Observation:\n" + L[4]), assistant(out[4]),
        user("Current Observation:\n" + S[5] + "\n" + L[5] + "\n\n" + NAIVE)]
    assert bodies[20]["messages"] == (
        [user(env.instruction), assistant(out[4])]                 # 32 events: one leftover action
        + [m for i in range(5, 20) for m in (user("Observation:\n" + L[i]), assistant(out[i]))]
        + [user("Current Observation:\n" + S[20] + "\n" + L[20] + "\n\n" + NAIVE)])

    # Done when: BALROG's request at step 20
    m = bodies[20]["messages"]
    assert len(m) == 33 and m[0] == user(env.instruction) and "system" not in {x["role"] for x in m}
    assert [x["role"] for x in m[1:]] == ["assistant", "user"] * 16
    assert sum(x["content"].startswith("Observation:\n") for x in m) == 15
    assert m[-1]["content"].startswith("Current Observation:\n" + S[20] + "\n")
    assert not any(S[20] in x["content"] for x in m[:-1])      # short-term context: the last only


def test_feedback_words_on_the_real_crafter_observation():
    bodies, records, L, S = play_scripted("crafter", "naive", CRAFTER_NAIVE[:4])
    assert records[2]["action"] == {"raw": "move north", "executed": "Noop", "valid": False}
    assert bodies[3]["messages"][-1]["content"] == (
        "Current Observation:\nYour status:\n- health: 9/9\n- food: 9/9\n- drink: 9/9\n- energy: 9/9\n\n"
        "You have nothing in your inventory.\n\n\n"
        "Your previous output did not contain a valid action. Defaulted to action: Noop\n\n"
        "Observation:\nYou see:\n- grass 1 step to your west\n- tree 6 steps to your north-east\n\n"
        "You face grass at your front.\n\n" + NAIVE)
    assert L[3] == "You see:\n- grass 1 step to your west\n- tree 6 steps to your north-east\n\nYou face grass at your front."


def test_cot_keeps_the_previous_plan_for_the_newest_action_only():
    replies = ["Grass west.\nACTION: Move West",
               "Tree far. ACTION: Do ACTION: Move North.",
               "Hmm... ACTION: 42",                       # digits vanish: an empty output
               "Let me think.\nACTION: move east",        # case: not an action
               "Plan: go south.\nACTION: Move South",
               "ACTION: Do"]
    bodies, records, L, S = play_scripted("crafter", "cot", replies)
    assert [r["action"]["raw"] for r in records] == ["Move West", "Move North", "", "move east", "Move South", "Do"]
    assert [r["action"]["executed"] for r in records] == ["Move West", "Move North", "Noop", "Noop", "Move South", "Do"]
    env = envs.make_env("crafter", seed=42)
    assert bodies[1]["messages"] == [
        user(env.instruction), user("Observation:\n" + L[0]), assistant("Previous plan:\n" + replies[0]),
        user("Current Observation:\n" + S[1] + "\n" + L[1] + "\n\n" + COT)]
    assert bodies[5]["messages"] == [
        user(env.instruction),
        user("Observation:\n" + L[0]), assistant("Move West"),
        user("Observation:\n" + L[1]), assistant("Move North"),
        user("Observation:\n" + L[2]),                             # an empty output is not added
        user("Observation:\n" + feedback("Noop") + L[3]), assistant("move east"),
        user("Observation:\n" + feedback("Noop") + L[4]), assistant("Previous plan:\n" + replies[4]),
        user("Current Observation:\n" + S[5] + "\n" + L[5] + "\n\n" + COT)]


def test_cot_request_at_step_20_on_nethack():
    """The full window on a real game: the instruction, one leftover action, 15 (observation,
    action) pairs, the current observation. Only the newest action shows `Previous plan:` with the
    reply that chose it; older ones show the parsed action, an invalid one as given."""
    moves = ["west", "north", "east", "south", "search", "far west", "Search", "esc"] * 3
    replies = [f"Plan {chr(65 + i)}: the corridor, then {m}.\nACTION: {m}" for i, m in enumerate(moves[:21])]
    bodies, records, L, S = play_scripted("nle", "cot", replies)
    out = [r["action"]["raw"] for r in records]
    assert out == moves[:21]
    assert [i for i, r in enumerate(records) if not r["action"]["valid"]] == [6, 14]   # "Search": case
    L[7], L[15] = feedback("esc") + L[7], feedback("esc") + L[15]
    env = envs.make_env("nle", seed=42)
    m = bodies[20]["messages"]
    assert m == ([user(env.instruction), assistant(out[4])]
                 + [x for i in range(5, 19) for x in (user("Observation:\n" + L[i]), assistant(out[i]))]
                 + [user("Observation:\n" + L[19]), assistant("Previous plan:\n" + replies[19])]
                 + [user("Current Observation:\n" + S[20] + "\n" + L[20] + "\n\n" + COT)])
    assert len(m) == 33 and [x["role"] for x in m] == ["user"] + ["assistant", "user"] * 16
    assert [i for i, x in enumerate(m) if x["content"].startswith("Previous plan:")] == [31]
    assert m[-1]["content"].startswith("Current Observation:\ninventory:\n")
    assert not any(S[20] in x["content"] for x in m[:-1])      # short-term context: the last only


def test_robust_agents_keep_bare_actions_and_their_fallbacks():
    bodies, records, _, _ = play_scripted("crafter", "robust_cot", [
        "I think west. <|ACTION|> Move West <|END|>", "Going on without tags: Do", "<|ACTION|>Do<|END|>"])
    assert [r["action"]["raw"] for r in records] == ["Move West", ROBUST_COT_FAILURE, "Do"]
    assert [x["content"] for x in bodies[2]["messages"] if x["role"] == "assistant"] == ["Move West", ROBUST_COT_FAILURE]
    assert bodies[2]["messages"][-1]["content"].endswith("\n\n" + BALROG_INSTRUCTIONS["robust_cot"])
    bodies, records, _, _ = play_scripted("nle", "robust_naive", ["<|ACTION|>west<|END|>", "search"])
    assert [r["action"] for r in records] == [{"raw": "west", "executed": "west", "valid": True},
                                              {"raw": "search", "executed": "search", "valid": True}]
    assert bodies[1]["messages"][-1]["content"].endswith("\n\n" + BALROG_INSTRUCTIONS["robust_naive"])


def test_history_window_text_and_reasoning_limits():
    h = HistoryPrompt("Play.", max_text_history=2)       # 4 events
    h.add_observation("o1", "")
    h.add_observation("o2", "")                           # an empty output added no action
    h.reasoning = "why a"
    h.add_action("a")
    h.add_observation("o3", "inventory")
    assert h.messages() == [user("Play."), user("Observation:"), user("Observation:\no2"),   # o1: text dropped
                            assistant("Previous plan:\nwhy a"), user("Current Observation:\ninventory\no3")]
    h.add_action("b")                                     # still carries the latest reasoning
    h.add_observation("o4", "")
    assert h.messages() == [user("Play."), assistant("a"), user("Observation:\no3"),
                            assistant("Previous plan:\nwhy a"), user("Current Observation:\no4")]


# what each agent reads off a (stripped) reply, and whether Crafter accepts it
EXTRACTION = [
    ("naive", "Move West", "Move West", True),
    ("naive", "Move West.", "Move West", True),                   # punctuation is dropped
    ("naive", "**Move West**", "Move West", True),
    ("naive", "move west", "move west", False),                   # case-sensitive
    ("naive", "Move West\n.", "Move West\n", False),              # no strip after the filter
    ("naive", "Action: Move West", "Action: Move West", False),   # extra words stay
    ("naive", "Move-West", "MoveWest", False),
    ("naive", "Make Wood Pickaxe!", "Make Wood Pickaxe", True),
    ("naive", "<|ACTION|>Noop<|END|>", "ACTIONNoopEND", False),
    ("naive", "5", "", False),                                    # digits vanish
    ("cot", "Grass to the west.\nACTION: Move West", "Move West", True),
    ("cot", "ACTION: Do, no wait. ACTION: Move West.", "Move West", True),   # the last marker wins
    ("cot", "Move West", "Move West", True),                      # no marker: the whole reply
    ("cot", "I go west.\nAction: Move West", "I go west\nAction: Move West", False),  # marker is case-sensitive
    ("cot", "ACTION: Move West\nThat is safe.", "Move West\nThat is safe", False),
    ("cot", "ACTION: <Move West>", "Move West", True),
    ("cot", "ACTION:Do", "Do", True),
    ("robust_naive", "<|ACTION|>Move West<|END|>", "Move West", True),
    ("robust_naive", "<|ACTION|> Do <|END|> <|ACTION|>Noop<|END|>", "Do", True),   # the first tag
    ("robust_naive", "Move West", "Move West", True),             # no tags: the whole reply
    ("robust_naive", "<|ACTION|>Move West", "<|ACTION|>Move West", False),
    ("robust_naive", "<|ACTION|>move west<|END|>", "move west", False),
    ("robust_naive", "<|ACTION|>Move\nWest<|END|>", "Move\nWest", False),
    ("robust_naive", "<|ACTION|>Move West.<|END|>", "Move West.", False),        # no filter
    ("robust_cot", "West looks safe.\n<|ACTION|>Move West<|END|>", "Move West", True),
    ("robust_cot", "West looks safe.\nMove West", ROBUST_COT_FAILURE, False),
    ("robust_cot", "</|ACTION|>Do<|END|>", ROBUST_COT_FAILURE, False),           # the old closing tag
]


@pytest.fixture(scope="module")
def crafter():
    return envs.make_env("crafter")


@pytest.mark.parametrize("kind,reply,expected,valid", EXTRACTION)
def test_extraction_as_balrog(crafter, kind, reply, expected, valid):
    got = balrog_output(kind, reply)
    assert got == expected
    assert accepted(make_agent(kind, crafter), got) is valid   # play()'s own check


def test_nethack_letters_are_actions_digits_are_not():
    assert balrog_output("naive", "f") == "f" and balrog_output("naive", "12") == ""
    bodies, records, _, _ = play_scripted("nle", "naive", ["i", "Y", "3"])
    assert [r["action"]["valid"] for r in records] == [True, True, False]
    assert records[2]["action"]["executed"] == "esc"


def test_sampling_parameters_sent_are_only_those_set():
    bodies, *_ = play_scripted("nle", "naive", ["west"])
    assert {k: v for k, v in bodies[0].items() if k != "messages"} == {"model": "m", "max_tokens": 4096, "temperature": 1.0}
    bodies, *_ = play_scripted("nle", "naive", ["west"], max_new_tokens=64, temperature=None, top_p=0.9)
    assert {k: v for k, v in bodies[0].items() if k != "messages"} == {"model": "m", "max_tokens": 64, "top_p": 0.9}


def tiny_random_with(tmp_path, **settings):
    """tiny-random with `settings` added to its generation_config.json, as a model's own."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_random_path(), folder)
    own = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**own, **settings}))
    return str(folder)


def applied(backend):
    """One token generated with the kwargs the backend records: generate's raw logits and the
    scores it sampled from, which show the temperature and top-k it really applied."""
    enc = backend.tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    kwargs = {**backend.generate_kwargs(), "max_new_tokens": 1}
    with torch.inference_mode():
        out = backend.model.generate(**enc, **kwargs, output_logits=True, output_scores=True,
                                     return_dict_in_generate=True)
    return out.logits[0][0], out.scores[0][0]


def assert_applied(backend, temperature, kept):
    logits, scores = applied(backend)
    finite = torch.isfinite(scores)
    assert int(finite.sum()) == kept
    assert torch.allclose(scores[finite], logits[finite] / temperature)
    assert set(torch.topk(logits, kept).indices.tolist()) == set(finite.nonzero().flatten().tolist())


def test_hf_generate_kwargs_are_explicit_recorded_and_applied(tmp_path):
    """Every sampling setting generate gets is explicit: the run's, else the model's own
    generation_config.json, else one that changes nothing (no top_k=50 from a library default);
    and generate applies exactly what is recorded."""
    tiny = HFBackend("tiny-random", max_new_tokens=8)
    pad, vocab = tiny.tok.pad_token_id, tiny.model.config.vocab_size
    assert tiny.sampling == {"max_tokens": 8, "temperature": 1.0}
    assert tiny.generate_kwargs() == {"max_new_tokens": 8, "pad_token_id": pad, "do_sample": True,
                                      "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    # transformers 4.x fills an unset top_k with 50 on model.generation_config: not the model's
    tiny.model.generation_config.top_k = 50
    assert tiny.generate_kwargs()["top_k"] == 0
    assert_applied(tiny, 1.0, vocab)
    tiny.sampling = {"max_tokens": 8, "temperature": 0.7, "top_p": 0.8}
    assert tiny.generate_kwargs()["top_p"] == 0.8
    tiny.sampling = {"max_tokens": 8, "temperature": 0}
    assert tiny.generate_kwargs() == {"max_new_tokens": 8, "pad_token_id": pad, "do_sample": False}
    assert tiny.model_generation_config["eos_token_id"] == tiny.tok.eos_token_id

    # a model that sets its own sampling: the run's temperature wins, its top_k applies
    own = tiny_random_with(tmp_path, do_sample=True, temperature=0.5, top_k=20)
    model = HFBackend(own, max_new_tokens=8)
    assert model.model_generation_config["top_k"] == 20
    assert model.generate_kwargs() == {"max_new_tokens": 8, "pad_token_id": pad, "do_sample": True,
                                       "temperature": 1.0, "top_p": 1.0, "top_k": 20}
    assert_applied(model, 1.0, 20)
    model = HFBackend(own, max_new_tokens=8, temperature=None)      # none set: all the model's
    assert model.generate_kwargs() == {"max_new_tokens": 8, "pad_token_id": pad, "do_sample": True,
                                       "temperature": 0.5, "top_p": 1.0, "top_k": 20}
    assert_applied(model, 0.5, 20)
