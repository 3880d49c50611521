"""The agent's memory: a folder of text files that the model edits with ops it writes itself.

The model writes `<|OP|>arg1|arg2<|END|>` (the last argument may hold `|` and newlines);
`parse_ops` turns any model text into ops without ever raising, and `MemoryFS.execute` runs one
op and returns the text the model sees (errors included, as text). One folder per episode.
Every op has a kind: "read", "write" or "control" (DONE, ACTION); a scaffold's own ops declare
theirs, and traces, metrics and phase rules go by it.

Files are flat: a name is one path component of letters, digits, `.`, `_`, `-` (at most 64
characters, not starting with `.`); sub-folders are not allowed, which keeps the sandbox rule
one line long. Symbolic links are never followed, writes are atomic (temp file + rename), and
the whole memory is cached in RAM (it is small by limit), so a SEARCH never re-reads the disk and
`file_index()` is kept up to date incrementally. The folder belongs to one MemoryFS while it
runs: edits made to it from outside are not seen.
"""
import errno
import functools
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field

READ_ONLY_OPS = ("READ", "SEARCH", "TAIL", "COUNT")
WRITE_OPS = ("APPEND", "WRITE", "CREATE", "UPSERT", "DELETE")
ARITY = {"READ": 1, "SEARCH": 2, "TAIL": 2, "COUNT": 2, "APPEND": 2, "WRITE": 2, "CREATE": 1,
         "UPSERT": 3, "DELETE": 1, "DONE": 0, "ACTION": 1}
ALL_OPS = tuple(ARITY)
UPSERT_SEPARATOR = ": "
OTHER_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MAX_ACTION_CHARS = 60       # a longer "action" is prose, not an action name (as the authors')

# The authors' grammar. An op is its opening tag `<|NAME|>` (each pipe optional, exact case, no
# spaces) and everything after it up to the next END anywhere (`<|END|>`, `<|END|}`, pipes
# optional): non-greedy and across lines, so an op without its own END swallows the text up to
# the next one. Each op name is matched on its own, as the authors' one regex per name did.
END = r"<\|?END\|?[>}]"
TERMINATOR_RE = re.compile(rf"{END}|<\|?DONE\|?>")
# a piped tag of no known op, e.g. `<|FLY|>`, `<|read|>` (tags without a pipe, `<b>`, are prose)
PIPED_TAG_RE = re.compile(r"<\|([A-Za-z_]\w*)\|?>|<([A-Za-z_]\w*)\|>")
# The three action forms, tried in this order (the first match of the first form whose first
# match is usable is the authors' committed action): the tag (any case), `<ACTION>…</ACTION>`,
# and a line `ACTION: x` (x 1-40 characters; the blanks after the colon may cross a line break).
ACTION_FORMS = (re.compile(rf"<\|?ACTION\|?>(.*?){END}", re.S | re.I),
                re.compile(r"<ACTION>(.*?)</ACTION>", re.S | re.I),
                re.compile(r"(?:^|\n)\s*ACTION:\s*([^\n]{1,40})\s*(?=\n|$)", re.I))


def builtin_kind(name):
    """"read", "write", or "control" (DONE, ACTION, and names that are no op)."""
    return "read" if name in READ_ONLY_OPS else "write" if name in WRITE_OPS else "control"


@dataclass
class Op:
    name: str
    args: list = field(default_factory=list)
    error: str = None       # set when the op is malformed: execute() returns it to the model
    raw: str = ""           # the op's text as the model wrote it

    def to_json(self):
        return {"op": self.name, "args": self.args, "error": self.error}


@dataclass
class Parsed:
    ops: list               # every op in text order, malformed ones included (with .error)
    actions: list = field(default_factory=list)  # committed actions; the first is the authors' (see parse_ops)
    done: bool = False      # whether DONE was given

    @property
    def action(self):
        return self.actions[0] if self.actions else None


def clean_action(text):
    """An action name as models write it: quotes, backticks, markdown bold and a trailing period go."""
    text = text.strip().strip("`'\"*").strip()
    return text[:-1].rstrip().strip("`'\"*").strip() if text.endswith(".") else text


@functools.lru_cache(maxsize=64)
def _op_re(name):
    """An op of this name up to the next END, and its opening tag alone."""
    tag = rf"<\|?{re.escape(name)}\|?>"
    return re.compile(rf"{tag}(.*?){END}", re.S), re.compile(tag)


def parse_ops(text, allowed=None, arity=None):
    """All ops in `text`, in text order. `allowed`: op names this phase may use (None: all);
    `arity`: argument counts of scaffold-registered ops. Never raises.

    Committed actions (`Parsed.actions`), cleaned by `clean_action`: first the authors' pick (the
    first match of each form in turn, until one is a usable name: non-empty, under
    MAX_ACTION_CHARS), then every other usable match, form by form, in text order. Which one
    counts is the caller's choice: actions[0] is the authors', and the harness takes the first
    the game accepts."""
    arity = {**ARITY, **(arity or {})}
    allowed = None if allowed is None else {a.upper() for a in allowed}
    text = text if isinstance(text, str) else str(text)
    found = []          # (start, op)
    spans = []
    for name in arity:
        if name == "ACTION":
            continue
        whole, tag = _op_re(name)
        if arity[name] == 0:    # DONE: the tag alone
            found += [(m.start(), Op(name, raw=m.group(0))) for m in tag.finditer(text)]
            continue
        last = 0
        for m in whole.finditer(text):
            found.append((m.start(), _split_args(name, m.group(1), arity[name])))
            found[-1][1].raw = m.group(0)
            spans.append(m.span())
            last = m.end()
        for m in tag.finditer(text, last):   # no END anywhere after it: the authors dropped it
            found.append((m.start(), Op(name, error=f"{name} has no closing <|END|>: write <|{name}|>"
                                        f"{'|'.join(['...'] * arity[name])}<|END|>", raw=m.group(0))))
    pick, others = [], []   # pick: the authors' action (a form whose first match is unusable is passed over)
    for form, pattern in enumerate(ACTION_FORMS):
        for k, m in enumerate(pattern.finditer(text)):
            op = _action_op(m.group(1))
            op.raw = m.group(0)
            if form < 2:    # the tag forms are ops; an `ACTION:` line is not
                found.append((m.start(), op))
                spans.append(m.span())
            if op.error is None:
                (pick if k == 0 and not pick else others).append(op.args[0])
    for m in PIPED_TAG_RE.finditer(text):
        name = m.group(1) or m.group(2)
        if name not in arity and name.upper() != "END" and not any(a <= m.start() < b for a, b in spans):
            found.append((m.start(), Op(name, error=f"unknown op {name}; known ops: {', '.join(arity)}",
                                        raw=m.group(0))))
    parsed = Parsed(ops=[op for _, op in sorted(found, key=lambda f: f[0])])
    for op in parsed.ops:
        if op.error is None and allowed is not None and op.name not in allowed:
            op.error = f"{op.name} is not allowed here; allowed ops: {', '.join(sorted(allowed))}"
        parsed.done |= op.name == "DONE" and op.error is None
    if allowed is None or "ACTION" in allowed:
        parsed.actions = pick + others
    return parsed


def _action_op(body):
    action = body.strip()
    if len(action) >= MAX_ACTION_CHARS or not clean_action(action):
        return Op("ACTION", [action], error=f"ACTION takes one game action name (under "
                  f"{MAX_ACTION_CHARS} characters): <|ACTION|>action name<|END|>")
    return Op("ACTION", [clean_action(action)])


def remove_ops(text, name):
    """`text` without its `name` ops, stripped (e.g. the ACTION a memory specialist must not
    commit: every tag, `<ACTION>` pair and `ACTION:` line, as the authors removed them)."""
    patterns = ACTION_FORMS if name == "ACTION" else _op_re(name)[:1]
    for pattern in patterns:
        text = pattern.sub("", text)
    return text.strip()


def cut_after_last_terminator(text):
    """`text` up to its last op terminator (END or DONE, as the parser reads tags)."""
    ends = [m.end() for m in TERMINATOR_RE.finditer(text)]
    return text[:ends[-1]] if ends else text


def _split_args(name, body, n):
    parts = body.split("|", n - 1)
    args = [p.strip() for p in parts]
    if len(args) < n or any(a == "" for a in args[:n - 1]) or (n and args[-1] == "" and name != "WRITE"):
        return Op(name, args, error=f"{name} takes {n} argument{'s' * (n > 1)} separated by |: "
                  f"<|{name}|>{'|'.join(_ARG_NAMES.get(name, ['...'] * n))}<|END|>")
    if name == "TAIL":
        try:
            args[1] = int(args[1])
        except ValueError:
            return Op(name, args, error=f"TAIL needs a whole number of lines, got {args[1]!r}")
    return Op(name, args)


_ARG_NAMES = {"READ": ["file"], "SEARCH": ["file", "keyword"], "TAIL": ["file", "n"],
              "COUNT": ["file", "keyword"], "APPEND": ["file", "text"], "WRITE": ["file", "text"],
              "CREATE": ["file"], "UPSERT": ["file", "key", "text"], "DELETE": ["file"],
              "ACTION": ["action"]}


def _universal_newlines(text):
    """\\r\\n and \\r become \\n, as when the authors' store read a file back in text mode."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _normalise(text):
    return " ".join(text.lower().split())


class _File:
    """One file's text, kept with the derived forms that SEARCH and the counters need. Lines end
    where `str.splitlines()` ends them (\\r, \\x0c and \\u2028 too), as for the authors."""

    __slots__ = ("text", "lines", "_lower", "_norm", "_plain")

    def __init__(self, text, lines=None):
        self.text = text
        self.lines = len(text.splitlines()) if lines is None else lines
        self._lower = self._norm = self._plain = None

    @property
    def lower(self):
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def norm(self):
        if self._norm is None:
            self._norm = _normalise(self.text)
        return self._norm

    @property
    def plain(self):
        """Whether only \\n ends lines and lowering keeps every length (SEARCH's fast path)."""
        if self._plain is None:
            self._plain = len(self.lower) == len(self.text) and not OTHER_LINE_BREAKS.search(self.text)
        return self._plain

    def appended(self, add):
        """The file with `add` (whole lines) added; the lowered text is extended, not recomputed."""
        grown = _File(self.text + add, self.lines + len(add.splitlines()))
        if self._lower is not None:
            low = add.lower()
            if len(low) == len(add):
                grown._lower = self._lower + low
        return grown


def line_changes(old, new):
    """(removed, added): the lines of text `old` that `new` lacks, and the reverse, in file order
    (counted with repeats; a line that only moved is neither)."""
    def excess(a, b):
        extra, out = Counter(a) - Counter(b), []
        for line in a:
            if extra[line] > 0:
                extra[line] -= 1
                out.append(line)
        return out
    old_lines, new_lines = old.splitlines(), new.splitlines()
    return excess(old_lines, new_lines), excess(new_lines, old_lines)


def name_problem(name, max_chars=64):
    """None if `name` is a valid memory file name, else the reason it is refused."""
    if not isinstance(name, str) or name == "":
        return "a file name cannot be empty"
    if len(name) > max_chars:
        return f"file names have at most {max_chars} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "file names cannot hold control characters"
    if "/" in name or "\\" in name or ":" in name or ".." in name:
        return ("file names are plain names inside the memory folder: no folders, "
                "'..', drive letters or absolute paths")
    if not NAME_RE.fullmatch(name):
        return "file names use letters, digits, '.', '_' and '-', and do not start with '.'"
    return None


class MemoryRefused(Exception):
    """A refused op: its message is what the model sees."""


class MemoryFS:
    """One episode's memory folder. Limits are the scaffold's."""

    def __init__(self, root, max_file_bytes=65536, max_total_bytes=2_000_000, max_files=64,
                 max_result_chars=6000, search_cap=100, max_name_chars=64):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.max_file_bytes, self.max_total_bytes = max_file_bytes, max_total_bytes
        self.max_files, self.max_result_chars = max_files, max_result_chars
        self.search_cap, self.max_name_chars = search_cap, max_name_chars
        self._dir = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._files = {}
        self._bytes = {}
        for entry in os.scandir(self._dir):
            if entry.name.startswith(".tmp-"):
                os.unlink(entry.name, dir_fd=self._dir)  # left by a run killed mid-write
            elif entry.is_file(follow_symlinks=False) and name_problem(entry.name, self.max_name_chars) is None:
                self._load(entry.name)
        self._index = None
        self.extra_ops = {}  # name -> (arity, handler(*args) -> str, kind)
        self.phase = "log"
        self.counters = {}  # phase -> op -> {calls, errors, empty, redundant, bytes_read, ...}
        self._current_op = None
        self.last_flags = set()
        self._journal, self._epoch = [], 0

    def close(self):
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- names and disk ---------

    def _check_name(self, name):
        reason = name_problem(name, self.max_name_chars)
        if reason:
            raise MemoryRefused(f"refused file name {name!r}: {reason}")
        return name

    def _load(self, name):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self._dir)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return
            data = f.read()
        text = data.decode("utf-8", errors="replace")
        if text and not text.endswith("\n"):
            text += "\n"
        self._files[name] = _File(text)
        self._bytes[name] = len(text.encode())

    def _store(self, name, new):
        """Write `new` (a _File) atomically, then make it the cached content (a new file is
        journaled as created)."""
        data = new.text.encode()
        total = sum(self._bytes.values()) - self._bytes.get(name, 0) + len(data)
        if len(data) > self.max_file_bytes:
            raise MemoryRefused(f"{name} would be {len(data):,} bytes, over the {self.max_file_bytes:,}"
                               "-byte limit per file; nothing written (shorten it or use another file)")
        if total > self.max_total_bytes:
            raise MemoryRefused(f"memory would be {total:,} bytes, over the {self.max_total_bytes:,}-byte "
                               "total limit; nothing written (WRITE a shorter file or DELETE one)")
        if name not in self._files and len(self._files) >= self.max_files:
            raise MemoryRefused(f"memory already holds {self.max_files} files, the limit; "
                               "nothing written (DELETE one first)")
        tmp = f".tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                     dir_fd=self._dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self._dir)
            except OSError:
                pass
            raise
        if name not in self._files:
            self._journal.append(("create", name, None))
        self._files[name] = new
        self._bytes[name] = len(data)
        self._index = None

    # ---------------------------------------------------------------- public helpers ---------

    def write(self, name, text):
        """Replace a file (used for a scaffold's initial files)."""
        text = text if text.endswith("\n") or not text else text + "\n"
        self._store(self._check_name(name), _File(text))

    def read(self, name):
        """A file's text, None if there is no such file."""
        f = self._files.get(name)
        return None if f is None else f.text

    def files(self):
        return {name: f.text for name, f in self._files.items()}

    def file_index(self):
        """`name (N lines)` per file, sorted; rebuilt only after a change of files or sizes."""
        if self._index is None:
            if not self._files:
                self._index = "(no memory files)"
            else:
                self._index = "\n".join(f"{n} ({f.lines} line{'s' * (f.lines != 1)})"
                                        for n, f in sorted(self._files.items()))
        return self._index

    def register(self, name, handler, arity, kind):
        """A scaffold's own op: `handler(*args)` returns the result text; `kind` is "read" or
        "write" (what the harness lets it do, and how it is counted)."""
        name = name.upper()
        if name in ARITY:
            raise ValueError(f"{name} is a built-in op")
        if kind not in ("read", "write"):
            raise ValueError(f"{name}: a scaffold op's kind is 'read' or 'write', not {kind!r}")
        self.extra_ops[name] = (arity, handler, kind)

    def kind(self, name):
        return self.extra_ops[name][2] if name in self.extra_ops else builtin_kind(name)

    def parse(self, text, allowed=None):
        return parse_ops(text, allowed, {n: a for n, (a, _, _) in self.extra_ops.items()})

    def apply(self, name, *args):
        """Run a built-in op for the scaffold's own code (pruning, rewriting files): journaled in
        the step's diff, not counted as the model's. Returns the result; raises MemoryRefused."""
        if name not in READ_ONLY_OPS + WRITE_OPS:
            raise ValueError(f"{name} is not a memory op")
        return getattr(self, f"_op_{name.lower()}")(*args)

    # ---------------------------------------------------------------- counters, diffs --------

    def _count(self, key, n=1):
        if key in ("empty", "redundant", "errors"):
            self.last_flags.add(key)
        if self._current_op is None:  # a direct write (initial files), not a model's op
            return
        phase = self.counters.setdefault(self.phase, {})
        per = phase.setdefault(self._current_op, {})
        per[key] = per.get(key, 0) + n

    def mark(self):
        """Start recording changes; `diff_since(mark)` then tells what changed since."""
        self._epoch += 1
        self._journal = []
        return self._epoch

    def diff_since(self, mark):
        """Per changed file: created / deleted, appended lines, replaced content, upserted keys, and
        for each write a scaffold op made, the lines it removed and added (`edited`)."""
        if mark != self._epoch:
            raise ValueError("diff_since takes the latest mark")
        diff = {}
        for kind, name, payload in self._journal:
            d = diff.setdefault(name, {})
            if kind == "create":
                d["created"] = True
            elif kind == "delete":
                d.clear()
                d["deleted"] = True
            elif kind == "append":
                d.setdefault("appended", []).extend(payload)
            elif kind == "write":
                d.pop("appended", None)
                d.pop("edited", None)
                d["replaced"] = payload
            elif kind == "edit":
                op, removed, added = payload
                d.setdefault("edited", []).append({"op": op, "removed": removed, "added": added})
            elif kind == "upsert":
                d.setdefault("upserted", {})[payload[0]] = payload[1]
        return diff

    # ---------------------------------------------------------------- execute ----------------

    def execute(self, op):
        """Run one parsed op; the result is the text the model sees. Never raises for the
        model's mistakes: they come back as `error: ...` (including ops that parse_ops refused
        for the phase)."""
        self._current_op = op.name
        self.last_flags = set()  # what the trace should know of this op: empty, redundant, errors
        try:
            self._count("calls")
            if op.error:
                self._count("errors")
                return f"error: {op.error}"
            try:
                if op.name in self.extra_ops:
                    result = str(self.extra_ops[op.name][1](*op.args))
                else:
                    result = getattr(self, f"_op_{op.name.lower()}")(*op.args)
            except MemoryRefused as e:
                self._count("errors")
                return f"error: {e}"
            except Exception as e:  # a scaffold op's bug must not end the episode
                self._count("errors")
                if isinstance(e, ValueError) and op.name in self.extra_ops:   # it refused the model's arguments
                    return f"error: {op.name}: {e}"
                return f"error: {op.name} failed: {type(e).__name__}: {e}"
            if op.name in READ_ONLY_OPS:
                self._count("bytes_read", len(result.encode()))
            return self._cap(result)
        finally:
            self._current_op = None

    def _cap(self, result):
        if len(result) <= self.max_result_chars:
            return result
        cut = len(result) - self.max_result_chars
        return (result[:self.max_result_chars] +
                f"\n[... cut: {cut:,} more characters; use SEARCH or TAIL for a part]")

    def _get(self, name):
        self._check_name(name)
        if name not in self._files:
            listing = ", ".join(sorted(self._files)) or "none"
            raise MemoryRefused(f"{name} does not exist (files: {listing})")
        return self._files[name]

    def _newest(self, lines, taken):
        """The newest of `lines` that fit the result limit beside a header of `taken` characters:
        SEARCH and TAIL cut old lines, never new ones."""
        room, kept = self.max_result_chars - taken - 60, 0
        for line in reversed(lines):
            room -= len(line) + 1
            if room < 0:
                break
            kept += 1
        return lines[len(lines) - kept:]

    def _matches(self, f, keyword):
        """The lines of `f` that contain `keyword`, case-insensitively, in file order (a keyword
        holding a line break is in no line)."""
        kw = keyword.lower()
        if kw.splitlines() != [kw]:
            return []
        if not f.plain:
            return [line for line in f.text.splitlines() if kw in line.lower()]
        out, pos, text, low = [], 0, f.text, f.lower
        while True:
            hit = low.find(kw, pos)
            if hit < 0:
                return out
            start = low.rfind("\n", 0, hit) + 1
            end = low.find("\n", hit)
            out.append(text[start:end])
            pos = end + 1

    def _op_read(self, name):
        f = self._get(name)
        if not f.text:
            return f"{name} is empty"
        return f"{name} ({f.lines} line{'s' * (f.lines != 1)}):\n{f.text.rstrip(chr(10))}"

    def _op_search(self, name, keyword):
        f = self._get(name)
        hits = self._matches(f, keyword)
        if not hits:
            self._count("empty")
            return f"{name} is empty" if not f.text else f"{name}: no line contains {keyword!r}"
        shown = self._newest(hits[-self.search_cap:], len(name) + len(keyword))
        if len(shown) < len(hits):
            head = f"{name}: last {len(shown)} of {len(hits)} lines containing {keyword!r}"
        else:
            head = f"{name}: {len(hits)} line{'s' * (len(hits) != 1)} containing {keyword!r}"
        return head + ":\n" + "\n".join(shown)

    def _op_count(self, name, keyword):
        f = self._get(name)
        if not f.text:
            return f"{name} is empty"
        n = len(self._matches(f, keyword))
        return f"{name}: {n} line{'s' * (n != 1)} contain{'s' * (n == 1)} {keyword!r}"

    def _op_tail(self, name, n):
        """The lines `lines[-n:]` (n = 0: all of them; n = -1: all but the first, as for the
        authors), as many of the newest as fit the result limit."""
        f = self._get(name)
        if not f.text:
            return f"{name} is empty"
        lines = self._newest(f.text.splitlines()[-n:], len(name))
        return f"last {len(lines)} of {f.lines} lines of {name}:\n" + "\n".join(lines)

    def _redundant(self, name, text):
        f = self._files.get(name)
        norm = _normalise(text)
        if f is not None and norm and norm in f.norm:
            self._count("redundant")
            return " (note: this text was already in the file)"
        return ""

    def _op_append(self, name, text):
        self._check_name(name)
        text = _universal_newlines(text)
        note = self._redundant(name, text)
        old = self._files.get(name) or _File("")
        add = text.rstrip("\n") + "\n"
        lines = add.splitlines()
        self._store(name, old.appended(add))
        self._count("bytes_written", len(add.encode()))
        self._journal.append(("append", name, lines))
        f = self._files[name]
        return (f"appended {len(lines)} line{'s' * (len(lines) != 1)} to {name} "
                f"(now {f.lines} lines){note}")

    def _op_write(self, name, text):
        self._check_name(name)
        text = _universal_newlines(text)
        note = self._redundant(name, text)
        content = text + "\n" if text else ""
        old = self._files.get(name, _File("")).text
        self._store(name, _File(content))
        self._count("bytes_written", len(content.encode()))
        if self._current_op in self.extra_ops:   # a scaffold op's write shows as the lines it changed
            self._journal.append(("edit", name, (self._current_op, *line_changes(old, content))))
        else:
            self._journal.append(("write", name, content))
        return f"wrote {name} ({self._files[name].lines} lines){note}"

    def _op_create(self, name):
        self._check_name(name)
        if name in self._files:
            return f"{name} already exists ({self._files[name].lines} lines); nothing changed"
        self._store(name, _File(""))
        return f"created {name}"

    def _op_upsert(self, name, key, text):
        self._check_name(name)
        key = " ".join(key.split())
        line = f"{key}{UPSERT_SEPARATOR}{' '.join(text.split())}"
        old = self._files.get(name) or _File("")
        lines = old.text.splitlines()
        prefix = key + UPSERT_SEPARATOR
        where = next((i for i, existing in enumerate(lines) if existing.startswith(prefix)), None)
        if where is not None and lines[where] == line:
            self._count("redundant")
            return f"{name}: {key} already reads so; nothing changed"
        note = self._redundant(name, text) if where is None else ""
        if where is None:
            new = old.appended(line + "\n")
        else:
            lines[where] = line
            new = _File("".join(x + "\n" for x in lines))
        self._store(name, new)
        self._count("bytes_written", len(line.encode()) + 1)
        self._journal.append(("upsert", name, (key, line)))
        return f"{'updated' if where is not None else 'added'} {key} in {name}{note}"

    def _op_delete(self, name):
        self._get(name)
        os.unlink(name, dir_fd=self._dir)  # unlinks a link itself, never its target
        del self._files[name], self._bytes[name]
        self._index = None
        self._journal.append(("delete", name, None))
        return f"deleted {name}"

    def _op_done(self):
        return "done"

    def _op_action(self, action):
        return f"action committed: {action}"
