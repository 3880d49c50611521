"""memory_fs.py: ops, parser, sandbox, limits, atomicity, counters, diffs, fuzz."""
import os

import pytest
from hypothesis import given, settings, strategies as st

import memory_fs
from memory_fs import ARITY, MemoryFS, Op, parse_ops, remove_ops


@pytest.fixture
def fs(tmp_path):
    m = MemoryFS(tmp_path / "mem", search_cap=3, max_result_chars=400, max_file_bytes=300,
                 max_total_bytes=600, max_files=4)
    yield m
    m.close()


def run(fs, text, allowed=None):
    return [fs.execute(op) for op in fs.parse(text, allowed).ops]


# ---------------------------------------------------------------- parser ----------------------

def test_parser_forms_order_action_done():
    text = ("I will look first.\n```\n<|SEARCH|>map.md|tree<|END|>\n```\n"
            "<SEARCH>map.md|iron<END> <|TAIL>log.md|5<|END>  <COUNT|>log.md|cow<|END|}"
            "<|APPEND|>log.md|a|b\nc<|END|> <|ACTION|>Move West<|END|><|ACTION|>Do<|END|><|DONE|>")
    p = parse_ops(text)
    assert [(o.name, o.args, o.error) for o in p.ops] == [
        ("SEARCH", ["map.md", "tree"], None), ("SEARCH", ["map.md", "iron"], None),
        ("TAIL", ["log.md", 5], None), ("COUNT", ["log.md", "cow"], None),
        ("APPEND", ["log.md", "a|b\nc"], None), ("ACTION", ["Move West"], None),
        ("ACTION", ["Do"], None), ("DONE", [], None)]
    assert p.action == "Move West" and p.done


def test_parser_malformed_ops_become_errors():
    p = parse_ops("<|READ|><|END|> <|TAIL|>log.md|many<|END|> <|FLY|>x<|END|> "
                  "<|UPSERT|>map.md|k<|END|> <|APPEND|>log.md|text with no end")
    errors = [o.error for o in p.ops]
    assert all(errors), errors
    assert "READ takes 1 argument" in errors[0]
    assert "TAIL needs a whole number" in errors[1]
    assert errors[2].startswith("unknown op FLY")
    assert "UPSERT takes 3 arguments" in errors[3]
    assert "no closing <|END|>" in errors[4]
    assert p.action is None and not p.done


def test_an_op_runs_to_the_next_end_anywhere():
    """The authors' grammar (automem_reference.md 1.1): each op name is matched on its own, from
    its opening tag to the next END, across lines; an op with no END after it is dropped."""
    p = parse_ops("<|APPEND|>f.md|a note\n<|READ|>g.md<|END|>")
    assert [(o.name, o.args) for o in p.ops] == [("APPEND", ["f.md", "a note\n<|READ|>g.md"]), ("READ", ["g.md"])]
    assert [(o.name, o.args) for o in parse_ops("<|READ|>a.md <|READ|>b.md<|END|>").ops] == \
        [("READ", ["a.md <|READ|>b.md"])]                                  # the second READ is swallowed
    p = parse_ops("<|ACTION|>north <|READ|>f.md<|END|>")
    assert p.actions == ["north <|READ|>f.md"] and [o.name for o in p.ops] == ["ACTION", "READ"]
    p = parse_ops("<|READ|>a.md<|END|> <|APPEND|>f.md|no end")
    assert [(o.name, o.args, o.error) for o in p.ops] == [
        ("READ", ["a.md"], None),
        ("APPEND", [], "APPEND has no closing <|END|>: write <|APPEND|>...|...<|END|>")]


def test_tag_forms():
    """Each pipe is optional; END also closes with `}`; no spaces, exact case, `</NAME>` is no END."""
    p = parse_ops("<|READ|>a.md<|END|} <READ>b.md<END> <|READ>c.md<END|> <READ|>d.md<|END>")
    assert [(o.name, o.args) for o in p.ops] == [("READ", [f"{x}.md"]) for x in "abcd"]
    assert parse_ops("<| READ |>a.md<|END|> <|READ|}b.md<|END|>").ops == []
    assert [o.error for o in parse_ops("<|READ|>a.md</READ>").ops] == [
        "READ has no closing <|END|>: write <|READ|>...<|END|>"]
    assert [(o.name, o.error[:15]) for o in parse_ops("<|read|>a.md<|END|>").ops] == [("read", "unknown op read")]


@pytest.mark.parametrize("text,actions", [
    ("<|ACTION|>Move West<|END|}", ["Move West"]),
    ("<action>Do</action>", ["Do"]),                                      # the second form, any case
    ("Thinking.\nACTION: Move North", ["Move North"]),                   # the third form
    ("  action:   far east  \nmore", ["far east"]),
    ("ACTION:\nnorth", ["north"]),                                       # the blanks cross a line break
    ("ACTION: " + "x" * 40, ["x" * 40]),                                 # 1-40 characters
    ("ACTION: " + "x" * 41, []),
    ("Final ACTION: north", []),                                         # the line starts with ACTION
    ("**ACTION:** west", []),
    ("<|ACTION|>west", []),                                              # no END: dropped
    ("I go <|ACTION|>north\nACTION: south", ["south"]),
    ("<|ACTION|>" + "y" * 60 + "<|END|>\nACTION: south", ["south"]),    # 60 characters: prose
    ("<|ACTION|><|END|>\nACTION: east", ["east"]),
    ("<|ACTION|>kick d<|END|>\nACTION: north", ["kick d", "north"]),
    ("ACTION: a\nACTION: b", ["a", "b"]),
    # the authors' pick first (the first form's first match), then the rest form by form
    ("<|ACTION|>a<|END|> <|ACTION|>d<|END|>\nACTION: c\n<ACTION>b</ACTION>", ["a", "d", "b", "c"]),
    ("Format: <|ACTION|>action name<|END|>. So <|ACTION|>west<|END|>", ["action name", "west"]),
    ('<|ACTION|>"north".<|END|>', ["north"]),                            # ours: quotes, a period
    ("<|ACTION|>`far east`<|END|>", ["far east"]),                       # backticks
    ("ACTION: **Move West**", ["Move West"]),                            # markdown bold
])
def test_action_forms(text, actions):
    assert parse_ops(text).actions == actions
    assert parse_ops(text, allowed=["READ"]).actions == []               # not where ACTION is not allowed


def test_remove_ops():
    """A specialist's ACTION goes in all three forms, as the authors removed it (an `<ACTION>` with
    an END after it is the tag form: it takes the text up to that END)."""
    text = "I think.\n<|ACTION|>west<|END|> then\nACTION: north\n<|READ|>f.md<|END|>"
    assert remove_ops(text, "ACTION") == "I think.\n then\n<|READ|>f.md<|END|>"
    assert remove_ops("go <ACTION>Do</ACTION>\nACTION: x\n<|READ|>f.md<|END|>", "ACTION") == "go"
    assert remove_ops(text, "READ") == "I think.\n<|ACTION|>west<|END|> then\nACTION: north"


def test_parser_ignores_prose_tags_and_phase_rules():
    p = parse_ops("<think>hmm</think> <b>bold</b> just text")
    assert p.ops == []
    p = parse_ops("<|APPEND|>log.md|x<|END|><|ACTION|>north<|END|>", allowed=["READ", "ACTION"])
    assert "not allowed" in p.ops[0].error and p.action == "north"


def test_scaffold_registered_op(fs):
    fs.register("MARK", lambda x, y: f"marked {x},{y}", 2, "write")
    assert run(fs, "<|MARK|>3|4<|END|>") == ["marked 3,4"]
    assert fs.kind("MARK") == "write" and fs.kind("SEARCH") == "read" and fs.kind("DONE") == "control"
    fs.register("BOOM", lambda: 1 / 0, 0, "read")
    assert run(fs, "<|BOOM|>")[0].startswith("error: BOOM failed: ZeroDivisionError")
    with pytest.raises(ValueError):
        fs.register("read", lambda: "", 1, "read")
    with pytest.raises(ValueError):
        fs.register("PEEK", lambda: "", 1, "control")


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<|>}ENDREADSEARCHTAILCOUNTAPPENDUPSERTDONEACTION"
                                              "endread \n`ab12.md-")), max_size=120))
def test_parser_fuzz_never_raises_and_ops_are_well_formed(text):
    p = parse_ops(text)
    for op in p.ops:
        assert isinstance(op, Op) and op.name
        if op.error is None:
            assert op.name in ARITY and len(op.args) == ARITY[op.name]
            if op.name == "TAIL":
                assert isinstance(op.args[1], int)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["<|READ|>", "<|SEARCH|>", "<|APPEND|>", "<|END|>", "<|DONE|>",
                                 "<|ACTION|>", "<TAIL>", "<|end>", "|", "a.md", "3", "x\ny",
                                 "```", "<|UPSERT|>", "<|END|}", "<|WRITE|>", "<|DELETE|>"]),
                max_size=25))
def test_parser_fuzz_mutated_op_strings_execute_safely(tmp_path_factory, parts):
    fs = MemoryFS(tmp_path_factory.mktemp("fz"))
    for op in fs.parse("".join(parts)).ops:
        assert isinstance(fs.execute(op), str)
    fs.close()


# ---------------------------------------------------------------- ops -------------------------

def test_every_op(fs):
    assert run(fs, "<|READ|>a.md<|END|>") == ["error: a.md does not exist (files: none)"]
    assert run(fs, "<|SEARCH|>a.md|x<|END|><|TAIL|>a.md|2<|END|><|COUNT|>a.md|x<|END|>") == \
        ["error: a.md does not exist (files: none)"] * 3
    assert run(fs, "<|CREATE|>a.md<|END|>") == ["created a.md"]
    assert run(fs, "<|READ|>a.md<|END|><|SEARCH|>a.md|x<|END|><|TAIL|>a.md|2<|END|><|COUNT|>a.md|x<|END|>") == \
        ["a.md is empty"] * 4
    assert run(fs, "<|CREATE|>a.md<|END|>") == ["a.md already exists (0 lines); nothing changed"]
    assert run(fs, "<|APPEND|>a.md|wood at 3,4\nTree at 5,6<|END|>") == \
        ["appended 2 lines to a.md (now 2 lines)"]
    assert run(fs, "<|APPEND|>a.md|stone at 1,1<|END|>")[0] == "appended 1 line to a.md (now 3 lines)"
    assert run(fs, "<|READ|>a.md<|END|>") == ["a.md (3 lines):\nwood at 3,4\nTree at 5,6\nstone at 1,1"]
    assert run(fs, "<|SEARCH|>a.md|TREE<|END|>") == ["a.md: 1 line containing 'TREE':\nTree at 5,6"]
    assert run(fs, "<|SEARCH|>a.md|lava<|END|>") == ["a.md: no line contains 'lava'"]
    assert run(fs, "<|COUNT|>a.md|at<|END|>") == ["a.md: 3 lines contain 'at'"]
    assert run(fs, "<|TAIL|>a.md|2<|END|>") == ["last 2 of 3 lines of a.md:\nTree at 5,6\nstone at 1,1"]
    assert run(fs, "<|TAIL|>a.md|0<|END|>") == ["last 3 of 3 lines of a.md:\nwood at 3,4\nTree at 5,6\nstone at 1,1"]
    assert run(fs, "<|UPSERT|>map.md|(3,4)|tree<|END|>") == ["added (3,4) in map.md"]
    assert run(fs, "<|UPSERT|>map.md|(5,5)|water<|END|>") == ["added (5,5) in map.md"]
    assert run(fs, "<|UPSERT|>map.md|(3,4)|stump, cut<|END|>") == ["updated (3,4) in map.md"]
    assert fs.read("map.md") == "(3,4): stump, cut\n(5,5): water\n"
    assert run(fs, "<|WRITE|>map.md|fresh\nstart<|END|>") == ["wrote map.md (2 lines)"]
    assert fs.read("map.md") == "fresh\nstart\n"
    assert run(fs, "<|DELETE|>map.md<|END|>") == ["deleted map.md"]
    assert not (fs_root(fs) / "map.md").exists()
    assert run(fs, "<|DONE|>") == ["done"]
    assert fs.file_index() == "a.md (3 lines)"
    # on disk exactly what the model sees
    assert (fs_root(fs) / "a.md").read_text() == "wood at 3,4\nTree at 5,6\nstone at 1,1\n"


def fs_root(fs):
    from pathlib import Path
    return Path(fs.root)


def test_lines_end_where_splitlines_ends_them(tmp_path):
    """As the authors' store (automem_reference.md 1.1): \\r (read back as \\n), \\x0c and \\u2028
    end lines in the index, SEARCH, COUNT and TAIL; a keyword holding a line break is in no line;
    TAIL takes any whole number, a negative n giving lines[-n:]."""
    fs = MemoryFS(tmp_path / "m")
    assert run(fs, "<|APPEND|>a.md|wood\rtree<|END|>") == ["appended 2 lines to a.md (now 2 lines)"]
    assert run(fs, "<|APPEND|>a.md|page\x0cbreak\u2028cow<|END|>") == ["appended 3 lines to a.md (now 5 lines)"]
    assert fs.read("a.md") == "wood\ntree\npage\x0cbreak\u2028cow\n"
    assert fs.file_index() == "a.md (5 lines)"
    assert run(fs, "<|SEARCH|>a.md|PAGE<|END|>") == ["a.md: 1 line containing 'PAGE':\npage"]
    assert run(fs, "<|COUNT|>a.md|e<|END|>") == ["a.md: 3 lines contain 'e'"]
    assert run(fs, "<|TAIL|>a.md|2<|END|>") == ["last 2 of 5 lines of a.md:\nbreak\ncow"]
    assert run(fs, "<|TAIL|>a.md|-3<|END|>") == ["last 2 of 5 lines of a.md:\nbreak\ncow"]
    assert run(fs, "<|SEARCH|>a.md|wood\ntree<|END|><|COUNT|>a.md|page\x0cbreak<|END|>") == [
        "a.md: no line contains 'wood\\ntree'", "a.md: 0 lines contain 'page\\x0cbreak'"]
    fs.close()


def test_search_cap_and_result_cut(fs):
    run(fs, "<|APPEND|>log.md|" + "\n".join(f"cow {i}" for i in range(6)) + "<|END|>")
    assert run(fs, "<|SEARCH|>log.md|cow<|END|>") == [
        "log.md: last 3 of 6 lines containing 'cow':\ncow 3\ncow 4\ncow 5"]
    fs.max_result_chars = 20
    assert run(fs, "<|READ|>log.md<|END|>") == [
        "log.md (6 lines):\nco\n[... cut: 33 more characters; use SEARCH or TAIL for a part]"]


def test_search_and_tail_over_the_result_limit_keep_the_newest_lines(tmp_path):
    fs = MemoryFS(tmp_path / "m", search_cap=1000, max_result_chars=60 + 80)
    fs.write("log.md", "\n".join(f"step {i:02d}: cow" for i in range(40)))   # 13 characters a line
    found = fs.execute(parse_ops("<|SEARCH|>log.md|cow<|END|>").ops[0])
    head, *lines = found.split("\n")
    assert head == "log.md: last 5 of 40 lines containing 'cow':" and lines == [f"step {i}: cow" for i in range(35, 40)]
    tail = fs.execute(parse_ops("<|TAIL|>log.md|30<|END|>").ops[0]).split("\n")
    assert tail[0] == "last 5 of 40 lines of log.md:" and tail[1:] == [f"step {i}: cow" for i in range(35, 40)]
    fs.close()


def test_limits(fs):
    assert "per file" in run(fs, "<|WRITE|>big.md|" + "x" * 400 + "<|END|>")[0]
    assert not (fs_root(fs) / "big.md").exists()
    run(fs, "<|WRITE|>a.md|" + "x" * 250 + "<|END|>")
    run(fs, "<|WRITE|>b.md|" + "y" * 250 + "<|END|>")
    assert "total limit" in run(fs, "<|WRITE|>c.md|" + "z" * 200 + "<|END|>")[0]
    run(fs, "<|CREATE|>c.md<|END|>")
    run(fs, "<|CREATE|>d.md<|END|>")
    assert "holds 4 files" in run(fs, "<|CREATE|>e.md<|END|>")[0]


@pytest.mark.parametrize("name", [
    "../evil.md", "/etc/passwd", "C:evil", "a/b.md", "..", ".", "", "x" * 65, "nul\x00.md",
    "tab\t.md", "new\nline", ".hidden", "back\\slash", "dir/../../x", "a..b",
])
def test_hostile_names_are_refused(fs, name):
    for text in (f"<|APPEND|>{name}|x<|END|>", f"<|READ|>{name}<|END|>"):
        out = run(fs, text)
        assert out and out[0].startswith("error"), (name, out)
    assert not os.path.exists(os.path.join(os.path.dirname(fs.root), "evil.md"))


def test_links_are_never_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    root = tmp_path / "mem"
    root.mkdir()
    os.symlink(outside, root / "link.md")
    os.symlink(tmp_path, root / "dirlink")
    fs = MemoryFS(root)
    assert fs.file_index() == "(no memory files)"          # links are not memory files
    assert run(fs, "<|READ|>link.md<|END|>")[0].startswith("error: link.md does not exist")
    # a write to the link's name replaces the link itself; the target is untouched
    run(fs, "<|WRITE|>link.md|mine<|END|>")
    assert outside.read_text() == "secret\n" and not os.path.islink(root / "link.md")
    os.symlink(outside, root / "late.md")                  # planted while running
    assert run(fs, "<|READ|>late.md<|END|>")[0].startswith("error")
    run(fs, "<|APPEND|>late.md|x<|END|>")
    assert outside.read_text() == "secret\n"
    run(fs, "<|DELETE|>late.md<|END|>")
    assert outside.exists()


def test_write_is_atomic(fs, monkeypatch):
    run(fs, "<|WRITE|>a.md|old content<|END|>")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")
    monkeypatch.setattr(memory_fs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fs.execute(parse_ops("<|WRITE|>a.md|new content<|END|>").ops[0])
    monkeypatch.undo()
    assert (fs_root(fs) / "a.md").read_text() == "old content\n"
    assert fs.read("a.md") == "old content\n"
    assert [p.name for p in fs_root(fs).iterdir()] == ["a.md"]  # no temp file left
    # a temp file left by a killed process is cleaned, and the old file is loaded back
    (fs_root(fs) / ".tmp-a.md").write_text("half")
    again = MemoryFS(fs.root)
    assert again.files() == {"a.md": "old content\n"} and not (fs_root(fs) / ".tmp-a.md").exists()


def test_counters_and_redundant_writes(fs):
    fs.phase = "log"
    run(fs, "<|APPEND|>a.md|Wood at (3,4)<|END|><|APPEND|>a.md|wood   AT (3,4)<|END|>"
            "<|SEARCH|>a.md|iron<|END|><|SEARCH|>a.md|wood<|END|><|READ|>zz.md<|END|>")
    fs.phase = "plan"
    run(fs, "<|UPSERT|>m.md|k|v<|END|><|UPSERT|>m.md|k|v<|END|><|TAIL|>a.md|1<|END|>")
    log, plan = fs.counters["log"], fs.counters["plan"]
    assert log["APPEND"] == {"calls": 2, "redundant": 1, "bytes_written": 15 + 15}
    assert log["SEARCH"]["calls"] == 2 and log["SEARCH"]["empty"] == 1
    assert log["SEARCH"]["bytes_read"] > 0 and log["READ"]["errors"] == 1
    assert plan["UPSERT"]["calls"] == 2 and plan["UPSERT"]["redundant"] == 1
    assert run(fs, "<|APPEND|>a.md|wood at (3,4)<|END|>")[0].endswith("already in the file)")


def test_diff_since_mark(fs):
    run(fs, "<|WRITE|>old.md|x<|END|><|APPEND|>keep.md|a<|END|>")
    m = fs.mark()
    run(fs, "<|APPEND|>keep.md|b\nc<|END|><|CREATE|>new.md<|END|><|DELETE|>old.md<|END|>"
            "<|UPSERT|>map.md|(1,1)|tree<|END|><|READ|>keep.md<|END|>")
    assert fs.diff_since(m) == {
        "keep.md": {"appended": ["b", "c"]},
        "new.md": {"created": True},
        "old.md": {"deleted": True},
        "map.md": {"created": True, "upserted": {"(1,1)": "(1,1): tree"}},
    }
    m2 = fs.mark()
    assert fs.diff_since(m2) == {}
    with pytest.raises(ValueError):
        fs.diff_since(m)


def test_a_scaffold_ops_write_shows_as_the_lines_it_changed(fs):
    """A scaffold op that rewrites a file (as UPSERT_MAP does) shows in the diff as the lines it
    removed and added, per call; a line that only moved is neither; a later WRITE replaces all."""
    def retag(key, text):   # the line starting with `key` is replaced by a new one, last
        lines = [line for line in fs.read("map.md").splitlines() if not line.startswith(key)]
        fs.apply("WRITE", "map.md", "\n".join(lines + [f"{key} {text}"]))
        return "retagged"
    fs.register("RETAG", retag, 2, "write")
    run(fs, "<|APPEND|>map.md|(1,1): tree\n(2,2): rock\n(3,3): door<|END|>")
    m = fs.mark()
    run(fs, "<|RETAG|>(1,1):|water<|END|><|RETAG|>(3,3):|door<|END|>")
    assert fs.read("map.md") == "(2,2): rock\n(1,1): water\n(3,3): door\n"
    assert fs.diff_since(m) == {"map.md": {"edited": [
        {"op": "RETAG", "removed": ["(1,1): tree"], "added": ["(1,1): water"]},
        {"op": "RETAG", "removed": [], "added": []}]}}
    run(fs, "<|WRITE|>map.md|gone<|END|>")
    assert fs.diff_since(m) == {"map.md": {"replaced": "gone\n"}}


def test_index_is_incremental(fs):
    run(fs, "<|APPEND|>a.md|1<|END|>")
    first = fs.file_index()
    assert fs.file_index() is first                     # cached while nothing changes
    run(fs, "<|SEARCH|>a.md|1<|END|>")
    assert fs.file_index() is first
    run(fs, "<|APPEND|>a.md|2<|END|>")
    assert fs.file_index() == "a.md (2 lines)"
