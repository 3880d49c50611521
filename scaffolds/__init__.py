"""Scaffolds: `scaffolds/vN/` folders, and how one is checked and loaded (`load_scaffold`).

A scaffold is scaffold.json (data its policy reads: ops per routine, limits, fallbacks, initial
memory files), prompts/*.txt (templates with {fields}), policy.py (the step, as plain Python
against agent.py's episode API: scaffolds/README.md), memory/ and CHANGES.md.
policy.py is written by an LLM in loop #1, so it is checked before it runs (`check_policy`: a
message names the file and line of the first problem), by allowlists (modules and their members,
builtins, attribute names) rather than by blocking names, and runs with its own builtins and
read-only views of the allowed modules per episode, under a time budget (`run_policy`); its
templates' fields are checked against its `ep.render` calls. It runs in the harness's process:
the checker and the budget close the ways out that Python offers, not memory exhaustion, so
loop #1 validates candidates in a subprocess without API keys (DESIGN.md).
"""
import ast
import builtins
import collections
import copy
import dataclasses
import faulthandler
import functools
import hashlib
import importlib
import json
import re
import signal
import sys
import threading
import types
from pathlib import Path

from envs import ENVS
from memory_fs import ALL_OPS, builtin_kind, name_problem

SCAFFOLDS = Path(__file__).resolve().parent
MEMORY_LIMITS = ("search_cap", "max_result_chars", "max_file_bytes", "max_total_bytes", "max_files")
# A step's budget, unless scaffold.json limits say otherwise: model turns per step, and seconds of
# the policy's own code between two model calls (v0 needs at most 30 turns and milliseconds).
STEP_LIMITS = {"step_turns": 50, "policy_seconds": 10}


class ScaffoldError(ValueError):
    """A scaffold that cannot be used; the message names the file (and line) at fault."""


class PolicyError(RuntimeError):
    """A policy broke a harness rule or raised while running (e.g. a write while the action is
    decided, a KeyError, a step over its budget): the episode fails."""


class OverBudget(BaseException):
    """Raised into policy code by the step timer. A BaseException, so a policy's `except
    Exception` does not swallow it (policy.py may not write a bare `except:` or `finally`)."""


def run_policy(path, seconds, fn, *args):
    """fn(*args): policy code (its module, setup, a step up to its next model call) with at most
    `seconds` of wall-clock time, its errors as PolicyError naming the line of `path`. The timer
    is SIGALRM, which only the main thread can take: elsewhere policy code runs unbounded. A
    signal is seen between bytecodes only, so code stuck inside one C call (sum(range(10**15)))
    cannot be interrupted: after 2 * seconds + 1 s faulthandler ends the process, with the
    traceback on stderr, rather than let the run hang."""
    timed = threading.current_thread() is threading.main_thread()
    armed = [timed]

    def alarm(signum, frame):
        if armed[0]:
            raise OverBudget()
    if timed:
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)   # then every 50 ms until disarmed
        faulthandler.dump_traceback_later(2 * seconds + 1, exit=True, file=sys.__stderr__)
    try:
        try:
            return fn(*args)
        finally:
            armed[0] = False   # first thing: an alarm that lands after this does nothing
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous or signal.SIG_DFL)
                faulthandler.cancel_dump_traceback_later()
    except StopIteration:
        raise
    except OverBudget as e:
        raise PolicyError(f"policy.py:{policy_line(e, path)}: over budget: more than {seconds} s of the "
                          "policy's own code without a model call (scaffold.json limits policy_seconds)") from None
    except Exception as e:
        why = str(e) if isinstance(e, PolicyError) else f"{type(e).__name__}: {e}"
        raise PolicyError(f"policy.py:{policy_line(e, path)}: {why}") from e


# What a policy may use of each module it may import: functions and constants for text and
# maths, by name. Left out on purpose: anything that takes attribute names as strings or evaluates
# strings or annotations (functools.update_wrapper, wraps, singledispatch, partialmethod,
# cached_property, total_ordering; string.Formatter and Template), classes a policy could patch
# (json.JSONEncoder) or whose methods, called on any object, set attributes on it
# (difflib.SequenceMatcher), namedtuple (it builds a class with exec), and modules. `random` is
# not importable: a policy's choices stay reproducible. `copy.deepcopy` is a checked stand-in
# (plain_deepcopy): the real one copies any object, the harness's included.
MODULE_MEMBERS = {name: tuple(members.split()) for name, members in {
    "re": "compile search match fullmatch findall finditer sub subn split escape error "
          "IGNORECASE I MULTILINE M DOTALL S VERBOSE X ASCII A",
    "math": "ceil floor trunc fabs sqrt isqrt exp log log2 log10 pow fsum prod gcd lcm comb perm factorial "
            "hypot dist copysign isclose isfinite isinf isnan sin cos tan asin acos atan atan2 degrees "
            "radians inf nan pi e tau",
    "json": "loads dumps JSONDecodeError",
    "collections": "Counter deque defaultdict OrderedDict",
    "itertools": "accumulate chain combinations combinations_with_replacement compress count cycle dropwhile "
                 "filterfalse groupby islice pairwise permutations product repeat starmap takewhile tee zip_longest",
    "functools": "partial reduce lru_cache cache cmp_to_key",
    "statistics": "mean fmean geometric_mean harmonic_mean median median_low median_high median_grouped mode "
                  "multimode pstdev pvariance stdev variance quantiles StatisticsError",
    "string": "ascii_letters ascii_lowercase ascii_uppercase digits hexdigits octdigits punctuation printable "
              "whitespace capwords",
    "textwrap": "wrap fill shorten dedent indent",
    "heapq": "heappush heappop heapify heapreplace heappushpop nlargest nsmallest merge",
    "bisect": "bisect bisect_left bisect_right insort insort_left insort_right",
    "difflib": "get_close_matches ndiff unified_diff",
    "copy": "deepcopy",
}.items()}
ALLOWED_IMPORTS = tuple(MODULE_MEMBERS)
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
               collections.Counter, collections.deque, collections.defaultdict, collections.OrderedDict)


def plain_deepcopy(data):
    """copy.deepcopy for plain data (containers of str, numbers, None), which is what a policy keeps
    in ep.state; anything else (the episode object, a function, a module view) is refused, since
    the real deepcopy would copy the harness objects behind it. Each object is checked once, so
    data that holds itself, or shares a part, is copied as deepcopy copies it."""
    stack, seen = [data], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) not in PLAIN_TYPES:
            raise TypeError(f"copy.deepcopy copies plain data only (containers of str, numbers, None), "
                            f"not {type(x).__name__}")
        if isinstance(x, collections.defaultdict) and x.default_factory not in (None, *PLAIN_TYPES):
            raise TypeError("copy.deepcopy: a defaultdict's factory must be a plain type, e.g. list")
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif not isinstance(x, (str, bytes)) and isinstance(x, (list, tuple, set, frozenset, collections.deque)):
            stack += list(x)
    return copy.deepcopy(data)


_MEMBERS = {name: types.MappingProxyType({k: plain_deepcopy if (name, k) == ("copy", "deepcopy")
                                          else getattr(importlib.import_module(name), k) for k in members})
            for name, members in MODULE_MEMBERS.items()}


class ModuleView:
    """What a policy sees of an allowed module: its listed members, read-only; one per episode."""
    __slots__ = ("_name", "_members")

    def __init__(self, name):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_members", _MEMBERS[name])

    def __getattr__(self, attr):
        if attr in self._members:
            return self._members[attr]
        raise AttributeError(f"{self._name}.{attr} is not available to a policy")

    def __setattr__(self, attr, value):
        raise AttributeError(f"{self._name} is read-only to a policy")

    def __delattr__(self, attr):
        raise AttributeError(f"{self._name} is read-only to a policy")


# Builtins a policy may use (nothing that runs, opens or inspects code, reaches types or
# attributes by name); the harness adds an __import__ that hands out module views, a print that
# writes into the step's trace line, and a hasattr limited to the attributes a policy may use.
SAFE_BUILTINS = tuple((
    "abs all any bool chr dict divmod enumerate filter float frozenset int isinstance iter len list map "
    "max min next ord pow range repr reversed round set slice sorted str sum tuple zip "
    "Exception ArithmeticError AttributeError IndexError KeyError LookupError RuntimeError StopIteration "
    "TypeError ValueError ZeroDivisionError").split())


PRINT_CHARS = 20_000   # of a step's printed text kept in its trace line


def policy_builtins(views, attributes, printed=None):
    """A policy's __builtins__, fresh per episode; `import x` gives `views[x]`; `hasattr` answers
    for the `attributes` a policy may use only; `print` appends to `printed` (a list the harness
    empties into each step's trace line; None: discarded)."""
    def policy_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name not in views:
            raise ImportError(f"policy.py may import only {', '.join(ALLOWED_IMPORTS)}")
        return views[name]

    def policy_print(*values, sep=" ", end="\n", flush=False, **others):
        if others:
            raise TypeError(f"print writes into the step's trace line only: it takes sep, end and flush, "
                            f"not {', '.join(map(repr, others))}")
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("print: sep and end are strings")
        if printed is None:
            return
        room = PRINT_CHARS - sum(map(len, printed))
        text = sep.join(map(str, values)) + end
        if room > 0:
            printed.append(text if len(text) <= room else text[:room] + f"\n[print: over {PRINT_CHARS} "
                                                                      "characters this step, the rest dropped]\n")

    def policy_hasattr(obj, name):
        if not isinstance(name, str):
            raise TypeError("hasattr: the attribute name is a str")
        return name in attributes and hasattr(obj, name)

    return {**{name: getattr(builtins, name) for name in SAFE_BUILTINS}, "__import__": policy_import,
            "print": policy_print, "hasattr": policy_hasattr}


# Named in error messages: builtins a policy may not use (they are not in SAFE_BUILTINS either).
BANNED_NAMES = {"open", "exec", "eval", "compile", "globals", "locals", "vars", "getattr", "setattr",
                "delattr", "dir", "input", "breakpoint", "help", "exit", "quit", "memoryview", "type",
                "object", "super", "classmethod", "staticmethod", "property", "id"}
REFUSED_NODES = {ast.ClassDef: "class definitions are not allowed: a class carries attributes that "
                               "the checker cannot follow; keep state in ep.state (a dict) and write functions",
                 ast.AsyncFunctionDef: "async code is not allowed", ast.Await: "async code is not allowed",
                 ast.AsyncFor: "async code is not allowed", ast.AsyncWith: "async code is not allowed",
                 ast.AnnAssign: "annotations are not allowed"}


@functools.cache
def allowed_attributes(api):
    """Every attribute a policy may use, by name: the episode API (`api`, agent.py's), the members of the
    allowed modules, and the public methods and fields of the types those and the builtins give
    (str, containers, numbers, compiled patterns and matches, exceptions, partial and cached
    functions). Not str.format / format_map (their fields walk attributes: "{0.__init__}") nor
    AttributeError.obj (the object of an attribute error raised anywhere, harness code included)."""
    samples = [str, int, float, list, dict, set, frozenset, tuple, range, slice, collections.Counter,
               collections.deque, collections.defaultdict, collections.OrderedDict, re.compile(""),
               re.match("", ""), StopIteration, AttributeError, json.JSONDecodeError("", "", 0), re.error(""),
               functools.partial(int),
               functools.lru_cache(int), functools.lru_cache(int).cache_info(), *api]
    names = {n for s in samples for n in dir(s) if not n.startswith("_")}
    names |= {f.name for s in api if dataclasses.is_dataclass(s) for f in dataclasses.fields(s)}
    names |= {n for members in MODULE_MEMBERS.values() for n in members}
    return frozenset(names - {"format", "format_map", "obj"})


def _dunder(name):
    return name.startswith("__")   # _helper is fine; __builtins__, __import__, __class__ are the harness's


def check_policy(tree, attributes):
    """(line, why) for every construct policy.py may not use. The rules close the ways out of the
    sandbox: modules and their members beyond the allowlists, names starting with `__` (dunders),
    builtins that run, open or inspect things, attributes beyond the allowlist (frames, code,
    str.format, the harness's private fields), any attribute assignment (it could patch a shared
    class, or carry data between episodes), annotations (some functions evaluate them), classes,
    `finally` and bare `except` (they could run policy code when the harness closes a step), and
    templates named or filled in ways the loader cannot check. `attributes`: the attribute names
    policy code may use (allowed_attributes)."""
    aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names}
    bad = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if type(node) in REFUSED_NODES:
            bad.append((line, REFUSED_NODES[type(node)]))
        elif isinstance(node, ast.Import):
            bad += [(line, f"import of {a.name!r} is not allowed (allowed: {', '.join(ALLOWED_IMPORTS)})")
                    for a in node.names if a.name not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module not in ALLOWED_IMPORTS:
                bad.append((line, f"import from {node.module!r} is not allowed (allowed: {', '.join(ALLOWED_IMPORTS)})"))
            else:
                bad += [(line, f"{node.module}.{a.name} is not available to a policy") for a in node.names
                        if a.name not in MODULE_MEMBERS[node.module]]
        elif isinstance(node, ast.Name) and (_dunder(node.id) or node.id in BANNED_NAMES):
            bad.append((line, f"the name {node.id!r} is not allowed"))
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
            given = getattr(node, "name", "")
            if _dunder(given):
                bad.append((line, f"names starting with '__' are not allowed ({given!r})"))
            if getattr(node, "returns", None) or any(a.annotation for a in _arguments(node.args)):
                bad.append((line, "annotations are not allowed"))
        elif isinstance(node, BINDERS):
            bad += [(line, f"names starting with '__' are not allowed ({given!r})")
                    for given in _bound_names(node) if _dunder(given)]
        elif isinstance(node, ast.Attribute):
            module = aliases.get(node.value.id) if isinstance(node.value, ast.Name) else None
            if not isinstance(node.ctx, ast.Load):
                bad.append((line, f"assigning or deleting .{node.attr} is not allowed (no attribute is: keep "
                                  "data in ep.state; ep.set_fallback(action) sets the fallback)"))
            elif module in MODULE_MEMBERS and node.attr not in MODULE_MEMBERS[module]:
                bad.append((line, f"{module}.{node.attr} is not available to a policy"))
            elif node.attr not in attributes:
                bad.append((line, f"the attribute .{node.attr} is not allowed"))
        elif isinstance(node, ast.MatchClass):
            bad += [(line, f"matching the attribute {a!r} is not allowed") for a in node.kwd_attrs
                    if a not in attributes]
        elif isinstance(node, (ast.Try, ast.TryStar)) and node.finalbody:
            bad.append((line, "finally blocks are not allowed: they would run policy code when the harness closes "
                              "a step (a timer, an error elsewhere); put the clean-up after the try/except instead"))
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            bad.append((line, "a bare except is not allowed (name what you catch: except ValueError)"))
    return bad


# Nodes that bind names given as strings, not as ast.Name nodes.
BINDERS = (ast.arg, ast.alias, ast.ExceptHandler, ast.MatchAs, ast.MatchStar, ast.MatchMapping, ast.Global, ast.Nonlocal)


def _bound_names(node):
    """The names a node binds that are not ast.Name nodes (`except E as x`, a match capture,
    `global x`): `except E as __builtins__` would delete the policy's builtins when it ends."""
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return node.names
    given = {ast.arg: "arg", ast.alias: "asname", ast.MatchMapping: "rest"}.get(type(node), "name")
    return [getattr(node, given) or ""]


def _arguments(args):
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]


def render_calls(tree):
    """(line, template, fields) of every `x.render("name", field=...)`, and (line, why) problems
    for renders the loader could not check."""
    calls, bad = [], []
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "render" and id(node) not in called:
            bad.append((node.lineno, "use .render only as ep.render('name', field=value, ...)"))
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "render"):
            continue
        if (len(node.args) != 1 or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str)
                or any(k.arg is None for k in node.keywords)):
            bad.append((node.lineno, "ep.render takes the template's name as a string literal and its fields "
                                     "as keywords (ep.render('plan', observation=...)), so the loader can check them"))
        else:
            calls.append((node.lineno, node.args[0].value, {k.arg for k in node.keywords}))
    return calls, bad


# A template's placeholders are {identifier}; {{ and }} are literal braces; any other brace is text.
FIELD_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z][A-Za-z0-9_]*)\}")


def template_fields(template):
    return {m.group(1) for m in FIELD_RE.finditer(template) if m.group(1)}


def render_template(template, fields):
    return FIELD_RE.sub(lambda m: str(fields[m.group(1)]) if m.group(1) else m.group(0)[0], template)


def _listed(folders):
    return [folders] if isinstance(folders, str) else folders if isinstance(folders, list) else [None]


@dataclasses.dataclass
class Scaffold:
    name: str
    path: Path
    config: dict          # scaffold.json: data the policy reads (ops per routine, limits, ...)
    prompts: dict         # template name -> text, from prompts/<name>.txt
    code: object          # policy.py, checked and compiled once; executed afresh per episode
    attributes: frozenset  # the attribute names policy code may use (allowed_attributes)

    @property
    def limits(self):
        return self.config["limits"]

    @property
    def games(self):
        """The games this scaffold plays (scaffold.json `games`; every game when it names none)."""
        return tuple(self.config.get("games", ENVS))

    def plays_problem(self, env_names):
        """Why this scaffold cannot play all of `env_names` (one line), or None."""
        others = [e for e in env_names if e not in self.games]
        if not others:
            return None
        return f"scaffold {self.name} plays {', '.join(self.games)}, not {', '.join(others)}"

    def limit(self, key):
        """A step limit (STEP_LIMITS): scaffold.json's, else the default."""
        return self.limits.get(key, STEP_LIMITS[key])

    def ops(self, routine):
        return self.config["ops"][routine]

    def memory_folders(self, env_name, task=None):
        """The folders of a task's initial memory files (scaffold.json: a folder or a list, under
        the task's name, else the game's)."""
        by_key = self.config["initial_files"]
        return [self.path / f for f in _listed(by_key[task] if task in by_key else by_key.get(env_name, []))]

    def initial_files(self, env_name, task=None):
        return {p.name: p.read_text() for folder in self.memory_folders(env_name, task)
                for p in sorted(folder.iterdir()) if p.is_file()}

    def content_hash(self):
        """sha256 over every file of the scaffold, for run configs."""
        h = hashlib.sha256()
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(self.path)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    def module(self, printed=None):
        """policy.py executed in fresh globals, builtins and module views: one per episode; its
        print() appends to `printed`."""
        views = {name: ModuleView(name) for name in ALLOWED_IMPORTS}
        namespace = {"__builtins__": policy_builtins(views, self.attributes, printed), "__name__": "policy"}
        self.run(exec, self.code, namespace)
        return namespace

    def run(self, fn, *args):
        """fn(*args), policy code, under the step budget (run_policy)."""
        return run_policy(self.path / "policy.py", self.limit("policy_seconds"), fn, *args)

    def render(self, name, fields):
        template = self.prompts.get(name)
        if template is None:
            raise PolicyError(f"no template prompts/{name}.txt")
        if set(fields) != template_fields(template):
            raise PolicyError(f"prompts/{name}.txt takes {sorted(template_fields(template))}, got {sorted(fields)}")
        return render_template(template, fields)


STAGING = ".staging"   # meta_scaffold.py propose writes a revision in vN.staging/ until it validates


def scaffold_dir(name_or_path):
    p = Path(name_or_path)
    if p.name.endswith(STAGING):
        raise ScaffoldError(f"{name_or_path} is a revision that meta_scaffold.py propose is writing or was "
                            "stopped writing, not a scaffold")
    if p.is_dir() and (p / "scaffold.json").exists():
        return p
    if (SCAFFOLDS / str(name_or_path)).is_dir():
        return SCAFFOLDS / str(name_or_path)
    known = ", ".join(sorted(d.name for d in SCAFFOLDS.iterdir() if d.is_dir() and not d.name.startswith("_")
                     and not d.name.endswith(STAGING)))
    raise ScaffoldError(f"unknown scaffold {name_or_path!r}: not a folder with scaffold.json, "
                        f"nor one of scaffolds/ ({known})")


def policy_line(error, path):
    """The line of policy.py (`path`) where `error` was raised: its deepest frame there, else 0."""
    tb, line = error.__traceback__, 0
    while tb is not None:
        line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == str(path) else line
        tb = tb.tb_next
    return line


def load_scaffold(name_or_path, api):
    """Read and check `scaffolds/vN/` (or a path): scaffold.json, prompts/*.txt, policy.py (the
    checker, against the episode API's classes `api`; its templates' fields, its ops). Errors name
    the file, and the line in policy.py. agent.load_scaffold gives it agent.py's API."""
    path = scaffold_dir(name_or_path)

    def fail(part, why):
        raise ScaffoldError(f"scaffold {path.name}: {part}: {why}")

    policy = path / "policy.py"
    read = [path / "scaffold.json", policy, path / "CHANGES.md", path / "prompts", *(path / "prompts").glob("*.txt")]
    link = next((p for p in read if p.is_symlink()), None)
    if link:
        fail(str(link.relative_to(path)), "a link: a scaffold's files are its own")
    config = _read_config(path, fail)
    if not policy.is_file():
        fail("policy.py", "missing (a scaffold's step is code: def step(ep))")
    prompts = {p.stem: p.read_text() for p in sorted((path / "prompts").glob("*.txt"))}
    try:
        tree = ast.parse(policy.read_text(), str(policy))
    except SyntaxError as e:
        fail(f"policy.py:{e.lineno}", f"SyntaxError: {e.msg}")
    calls, bad = render_calls(tree)
    attributes = allowed_attributes(api)
    bad += check_policy(tree, attributes)
    for line, template, fields in calls:
        want = template_fields(prompts.get(template, ""))
        if template not in prompts:
            bad.append((line, f"ep.render({template!r}): there is no prompts/{template}.txt"))
        elif fields != want:
            bad.append((line, f"ep.render({template!r}) must give exactly the fields of prompts/{template}.txt: "
                              f"missing {sorted(want - fields)}, unknown {sorted(fields - want)}"))
    if bad:
        line, why = sorted(bad)[0]
        fail(f"policy.py:{line}", why + (f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""))
    unused = sorted(set(prompts) - {t for _, t, _ in calls})
    if unused:
        fail(f"prompts/{unused[0]}.txt", "never rendered by policy.py (ep.render)")
    scaffold = Scaffold(path.name, path, config, prompts, compile(tree, str(policy), "exec"), attributes)
    try:
        module = scaffold.module()
    except PolicyError as e:
        raise ScaffoldError(f"scaffold {path.name}: {e}") from None
    if not isinstance(module.get("step"), types.FunctionType):
        fail("policy.py", "defines no step(ep) function")
    if not isinstance(module.get("setup", _listed), types.FunctionType):
        fail("policy.py", "setup, when there is one, is a function: def setup(ep)")
    _check_ops(config, module.get("OPS", {}), fail)
    return scaffold


def _read_config(path, fail):
    try:
        config = json.loads((path / "scaffold.json").read_text())
    except json.JSONDecodeError as e:
        fail("scaffold.json", f"not valid JSON ({e})")
    for key in ("ops", "limits", "fallback_action", "initial_files"):
        if not isinstance(config.get(key), dict):
            fail("scaffold.json", f"missing key {key!r} (an object)")
    games = config.get("games", list(ENVS))
    if not (isinstance(games, list) and games and all(g in ENVS for g in games)):
        fail("scaffold.json games", f"a non-empty list of games from {list(ENVS)}, got {games!r}")
    for key in MEMORY_LIMITS:
        if key not in config["limits"]:
            fail("scaffold.json limits", f"missing {key!r}")
    for key, v in config["limits"].items():
        if not isinstance(v, int) or v < 1:
            fail("scaffold.json limits", f"{key} must be a positive integer, got {v!r}")
    for env_name, folders in config["initial_files"].items():
        for folder in _listed(folders):
            why = _not_a_memory_folder(path, folder)
            if why:
                fail("scaffold.json initial_files", f"{env_name}: a folder of the scaffold or a list of them, "
                                                    f"got {folders!r} ({why})")
            for p in sorted((path / folder).iterdir()):
                why = ("a link: a scaffold's files are its own" if p.is_symlink() else
                       "not a file: a memory folder holds files only" if not p.is_file() else name_problem(p.name))
                if why:
                    fail(str(p.relative_to(path)), why)
    return config


def _not_a_memory_folder(path, folder):
    """Why `folder` (from scaffold.json) is not a folder inside the scaffold, or None: a relative
    path with no '..' and no link along the way (a link or '..' could copy any file on disk into
    memory and the prompts)."""
    if not isinstance(folder, str) or not folder:
        return "a folder is a path, relative to the scaffold"
    if Path(folder).is_absolute() or ".." in Path(folder).parts:
        return f"{folder} is not inside the scaffold"
    at = path
    for part in Path(folder).parts:
        at = at / part
        if at.is_symlink():
            return f"{at.relative_to(path)} is a link"
        if not at.is_dir():
            return f"{at.relative_to(path)} is not a folder"
    return None


def _check_ops(config, declared, fail):
    """policy.py's OPS, and scaffold.json's op lists: known ops, and no write op in a routine that
    commits the action (its outcome is recorded by a later step)."""
    kinds = {op: builtin_kind(op) for op in ALL_OPS}
    for op, spec in declared.items() if isinstance(declared, dict) else [(None, None)]:
        if (not isinstance(op, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", op) or op in ALL_OPS
                or not isinstance(spec, dict) or set(spec) != {"handler", "arity", "kind"}
                or not isinstance(spec["handler"], types.FunctionType) or not isinstance(spec["arity"], int)
                or spec["arity"] < 0 or spec["kind"] not in ("read", "write")):
            fail("policy.py OPS", f"{op!r}: a scaffold op is OPS['NAME'] = {{'handler': fn, 'arity': n, "
                                  "'kind': 'read' or 'write'}, NAME in capitals and not a built-in op")
        kinds[op] = spec["kind"]
    for routine, ops in config["ops"].items():
        if not isinstance(ops, list) or not ops:
            fail("scaffold.json ops", f"routine {routine!r} needs a list of ops")
        unknown = [o for o in ops if o not in kinds]
        if unknown:
            fail("scaffold.json ops", f"{routine} lists unknown ops {unknown} (policy.py OPS: {sorted(declared)})")
        writes = [o for o in ops if kinds[o] == "write"]
        if "ACTION" in ops and writes:
            fail("scaffold.json ops", f"{routine} commits the action, so it may not write memory ({writes}): "
                 "an action's outcome is recorded by a later step, after the environment has answered")
