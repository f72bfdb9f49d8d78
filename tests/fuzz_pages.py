"""What the pages show: every self-contained HTML page against its numbers, its inputs and HTML.

Each seed draws the inputs of the pages (:func:`draw_config`): a run's history written by hand in
the tracker's format (a constant or growing B_simple from 1e-3 to 1e15 examples, |G|² from 1e-30
to 1e6, a fixed or varying batch size, steps before the first estimate, skipped steps, a unit of
tokens with its tokens per example, plain then preconditioned records, an interval open above, an
estimate lost after the headline, per-group estimates ``groups=`` whose names hold any characters)
in a file whose name holds any characters; a throughput profile with user-named device and model
and a currency; a branch page's title and notes; a sweep's grid (sweep/synthetic.py) and its
study title; the explorer's noise scale and batch size. The user strings are drawn from pieces
that break HTML, attributes and inline scripts (``</script>``, ``<!--``, ``&``, quotes, U+2028,
U+2029, tags, event attributes) and from the pages' own template place-holders (``__DATA__``).

Checks (named as the page), each against a computation written here, never the page's code:

* ``report``: ``noisescale report -o PAGE --json`` (half the seeds; the others ``report_html`` of
  ``report_data`` with blank figures, and ``summary_dict``; the command run again without
  ``--force`` onto its page or onto the history refused, exit 2, both files kept): the page
  parsed with ``html.parser``; every
  user string shown exactly as given (the title, each group's name) and nowhere as markup; tags
  well formed, no external ``src``/``href``/``url()``, each figure an embedded PNG; the inline
  ``DATA`` parses back to the JSON's S_min, E_min and γ; the summary's numbers are the JSON's
  to the shown 4 digits (B_simple first and last, its interval, B_crit = E_min/S_min, S_min and
  E_min as counts, γ to 3 decimals, 1 + √γ, the % fewer, the other unit B·t or B/t), the regime
  of the run's batch size against the last B_simple by the paper's thirds (§2.2), each cost
  row by eq. 2.11 and D.4 by hand (S = S_min + E_min/B, E = B·S, S/S_min = 1 + B_crit/B,
  E/E_min = 1 + B/B_crit, adaptive S_min + γ·E_min/B and E_min + γ·S_min·B); no ``nan``/``inf``
  and no positive count shown as 0; the page's calculator, run in node with a stub ``document``
  at a random batch size, against eq. 2.11 and D.4;
* ``hardware``: :func:`recommendation_html` of a profile priced by ``recommend_batch_size``: the
  model's and device's names and the currency shown exactly, the table's S/S_min = 1 + B_noise/B
  and E/E_min = 1 + B/B_noise by hand to the shown 3 digits, markup as above;
* ``branch``: :func:`branch_html` with the drawn title and notes: shown exactly, markup as above;
* ``sweep``: :func:`pareto_html` of a synthetic grid's fit with the drawn title: shown exactly,
  each row's goal, markup as above;
* ``explore``: :func:`explore_html` at the drawn noise scale and batch size (or its refusal,
  naming the bound), its initial data parsed back, the page's readouts run in node at random
  batch sizes against eq. 2.6, 2.7 and 2.11 (``calc``'s numbers, docs and README).

Tolerances: the shown numbers are compared as strings after rounding the truth the way the page
says it rounds (4 significant digits, counts to integers), with one unit of the last digit of
slack where the truth lies within float64 round-off (1e-12 relative) of a rounding boundary;
the node readouts against the closed forms to 1e-12 relative (float64 round-off of a few
operations). Classes per check: ``ok``; ``refused-ok`` (a refusal naming its cause);
``WRONG-SILENT`` (a number or string shown wrong, no word); ``INJECTED`` (user text turned into
markup or script); ``NOT-SELF-CONTAINED``; ``crash``; ``FALSE-REFUSAL``; ``skip``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

CHECKS = ("report", "hardware", "branch", "sweep", "explore")
FINDINGS = ("WRONG-SILENT", "INJECTED", "NOT-SELF-CONTAINED", "crash", "FALSE-REFUSAL", "MALFORMED")
NODE = shutil.which("node")
RTOL = 1e-12  # float64 round-off of a handful of operations

# Pieces of user strings: markup, attribute and script breakers, the templates' place-holders.
PIECES = (
    "</script><script>alert(1)</script>",
    "<!--",
    "-->",
    "&amp;",
    "&",
    '"',
    "'",
    "\u2028",
    "\u2029",
    "<b>x</b>",
    '" onmouseover="x',
    "<img src=x onerror=y>",
    "__DATA__",
    "__UNIT__",
    "__GROUPS__",
    "__SUMMARY__",
    "__TEXT_JS__",
    "__TITLE__",
    "{title}",
    "{unit}",
    "ü∑",
    "layer.0",
    "  ",
)


def user_string(rng, allow_slash=True):
    parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 3))]
    text = "g" + "".join(parts)
    return text if allow_slash else text.replace("/", "\u2215")


# --- parsing ---------------------------------------------------------------------------------

VOID = {"meta", "img", "input", "br", "hr", "link", "col", "source", "wbr", "area", "base"}
# elements that close themselves implicitly in HTML (none of the pages relies on it for others)
OPTIONAL_END = {"p", "li", "td", "th", "tr", "option"}


class Page(HTMLParser):
    """Tags, attributes, visible text per element, scripts, comments and nesting errors."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.comments, self.errors = [], [], [], []
        self.stack, self.texts = [], []  # texts: (tag path, attrs of the innermost, text)
        self._attrs = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        if tag not in VOID:
            self.stack.append(tag)
            self._attrs.append(dict(attrs))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.stack and self.stack[-1] != tag and self.stack[-1] in OPTIONAL_END:
            self.stack.pop()
            self._attrs.pop()
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        self._attrs.pop()

    def handle_data(self, data):
        inner = self.stack[-1] if self.stack else ""
        if inner == "script":
            self.scripts.append(data)
        elif inner != "style":
            self.texts.append((tuple(self.stack), self._attrs[-1] if self._attrs else {}, data))

    def handle_comment(self, data):
        self.comments.append(data)

    def text(self):
        return "".join(t for *_, t in self.texts)

    def texts_in(self, tag, **attrs):
        """Texts directly in ``tag`` (``title``: the document's, not an SVG's tooltips)."""
        return [
            t
            for path, a, t in self.texts
            if path
            and path[-1] == tag
            and (tag != "title" or path[-2:-1] == ("head",))
            and all(a.get(k) == v for k, v in attrs.items())
        ]


def parse(page):
    p = Page()
    p.feed(page)
    p.close()
    if p.stack and p.stack != ["html"]:
        p.errors.append(f"unclosed {p.stack}")
    return p


def markup_findings(p, users, scripts=0, pngs=True):
    """No user string as markup, well formed, self-contained: [(class, why)]."""
    out = []
    markers = [u for u in users if u]
    for tag, attrs in p.tags:
        for name, value in attrs:
            if name.startswith("on"):
                out.append(("INJECTED", f"<{tag} {name}=...>"))
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                out.append(("NOT-SELF-CONTAINED", f"<{tag} {name}={value[:80]!r}>"))
            if name == "src" and value and value.startswith("data:image/png;base64,"):
                raw = base64.b64decode(value.split(",", 1)[1])
                if pngs and (not raw.startswith(b"\x89PNG\r\n\x1a\n") or len(raw) < 200):
                    out.append(("WRONG-SILENT", f"<{tag}> holds no PNG ({len(raw)} bytes)"))
        if tag in ("b", "img") and any(n in ("onerror", "onmouseover") for n, _ in attrs):
            out.append(("INJECTED", f"<{tag} {attrs}>"))
    n_scripts = sum(1 for t, _ in p.tags if t == "script")
    if n_scripts != scripts:
        out.append(("INJECTED", f"{n_scripts} <script> elements, the page has {scripts}"))
    if any("alert(1)" in s for s in p.scripts):
        out.append(("INJECTED", "a user string inside a script"))
    if p.comments and any(u for u in markers if "<!--" in u):
        out.append(("INJECTED", f"comment {p.comments[0][:60]!r} from a user string"))
    if p.errors:
        out.append(("MALFORMED", "; ".join(p.errors[:3])))
    for s in p.scripts:
        if re.search(r"\burl\(\s*['\"]?(https?:)?//", s) or "fetch(" in s:
            out.append(("NOT-SELF-CONTAINED", "a script fetches"))
    return out


# --- how the pages say they round (docs and report/text.py's docstrings) -----------------------


def g4(x):
    return format(float(x), ".4g")


def count(x):
    """A count rounded half up, with thousands separators; one that is not 0 but rounds to it
    to 4 digits (format_count's documented rule)."""
    if math.isnan(x):
        return "unknown"
    if math.isinf(x):
        return "∞"
    if x != 0 and abs(x) < 0.5:
        return g4(x)
    return f"{math.floor(x + 0.5):,}"


def same_shown(shown, truth, fmt):
    """``shown`` is ``fmt(truth)``, or ``fmt`` of a truth moved by float64 round-off (RTOL)."""
    return shown in {fmt(truth), fmt(truth * (1 + RTOL)), fmt(truth * (1 - RTOL))}


# --- the draws ---------------------------------------------------------------------------------


def draw_config(seed):
    rng = random.Random(seed)
    kind = rng.choice(["growing", "constant", "growing", "one", "lost", "huge", "tiny"])
    n = 1 if kind == "one" else rng.choice([3, 8, 20, 60, 150])
    b_exp = {"huge": rng.uniform(12, 15), "tiny": rng.uniform(-3, 0)}.get(kind, rng.uniform(0, 5))
    return {
        "kind": kind,
        "n_steps": n,
        "batch": rng.choice([1, 8, 64, 512, 4096]),
        "varying": rng.random() < 0.2,
        "a": 10.0**b_exp,
        "tau": None if kind == "constant" else rng.choice([10.0, 80.0, 1e4]),
        "g2_scale": 10.0 ** rng.choice([-30, -12, 0, 6]),
        "warmup": rng.choice([0, 1, 3]),
        "skipped": sorted(rng.sample(range(n), min(n // 10, 3))) if n > 5 else [],
        "tokens": rng.random() < 0.3,
        "tokens_per_example": rng.choice([1.0, 8.0, 13.5, 1000.0]),
        "precond_from": rng.choice([None, None, n // 2]) if n > 4 else None,
        "open_high": rng.random() < 0.25,
        # (distinct: a history's groups are a dict)
        "groups": list(dict.fromkeys(user_string(rng) for _ in range(rng.randint(0, 3)))),
        "file": user_string(rng, allow_slash=False),
        "hw_device": user_string(rng),
        "hw_model": user_string(rng),
        "hw_currency": rng.choice([None, "USD", "€", "<b>", '"&']),
        "hw_b_noise": 10.0 ** rng.uniform(-0.5, 6),
        "branch_title": user_string(rng),
        "branch_note": user_string(rng),
        "sweep_title": user_string(rng),
        "explore_b_noise": 10.0 ** rng.uniform(-31, 16)
        if rng.random() < 0.3
        else 10.0 ** rng.uniform(-1, 7),
        "explore_batch": rng.choice([None, None, 1.0, 3.0, 2.0**30, 2.0**31, 0.5]),
        "calc_b": [10.0 ** rng.uniform(-1, 8) for _ in range(3)],
        # the command (figures drawn, seconds) or the library's page with blank figures (fast)
        "cli": rng.random() < 0.5,
        # tokens counted beside a history in examples (the page converts B_simple to tokens)
        "tokens_beside": rng.random() < 0.5,
    }


def history_records(cfg):
    """Records in the tracker's format with B_simple(t) = a·(1 + t/τ) (tests/test_report.py's
    synthetic_records, written again here with the draws' edge cases)."""
    n, batch, a, tau = cfg["n_steps"], cfg["batch"], cfg["a"], cfg["tau"]
    beside = cfg["tokens"] and cfg.get("tokens_beside", False)
    t_per = cfg["tokens_per_example"] if cfg["tokens"] and not beside else 1.0
    records, examples = [], 0
    for t in range(n):
        b = batch * (1 + (t % 3 == 2)) if cfg["varying"] else batch
        examples += b
        b_simple = a * (1.0 + t / tau) if tau is not None else a
        g2 = cfg["g2_scale"] / (1.0 + t / 50.0)
        rec = {
            "step": t,
            "skipped": t in cfg["skipped"],
            "b_big": b * t_per,
            "g2": g2,
            "trace_sigma": b_simple * t_per * g2,
            "g2_ema": g2,
            "trace_sigma_ema": b_simple * t_per * g2,
            "b_simple": b_simple * t_per,
            "b_simple_low": b_simple * t_per * 0.8,
            "b_simple_high": None if cfg["open_high"] and t == n - 1 else b_simple * t_per * 1.25,
            "loss": 0.5 + 2.0 * math.exp(-t / 150.0),
            "lr": 0.1,
            "temperature": 0.1 / b,
            "examples": examples,
        }
        if cfg["tokens"]:
            rec["tokens_seen"] = examples * cfg["tokens_per_example"]
            rec["tokens_per_example"] = cfg["tokens_per_example"]
        if cfg["precond_from"] is not None:
            rec["preconditioned"] = t >= cfg["precond_from"]
        if t < cfg["warmup"] or t in cfg["skipped"] or (cfg["kind"] == "lost" and t == n - 1):
            for k in ("g2", "trace_sigma", "g2_ema", "trace_sigma_ema"):
                rec[k] = None
            for k in ("b_simple", "b_simple_low", "b_simple_high"):
                rec[k] = None
        if t in cfg["skipped"]:
            rec["loss"] = None
        records.append(rec)
    if cfg["groups"] and records:
        last = records[-1]
        share = 1.0 / len(cfg["groups"])
        g2, tr = last.get("g2_ema") or cfg["g2_scale"], last.get("trace_sigma_ema") or 1.0
        last["groups"] = {
            name: {
                "b_simple": tr / g2,
                "b_simple_low": 0.5 * tr / g2,
                "b_simple_high": 2 * tr / g2,
                "g2_ema": g2 * share,
                "trace_sigma_ema": tr * share,
            }
            for name in cfg["groups"]
        }
    return records


# --- the checks --------------------------------------------------------------------------------


def _cli(argv):
    from noisescale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_report(cfg, seed):
    tmp = Path(tempfile.mkdtemp(prefix="fzpages"))
    try:
        header = {"kind": "noisescale.history", "version": 1, "beta": 0.99, "confidence": 0.95}
        if cfg["tokens"] and not cfg.get("tokens_beside", False):
            header["unit"] = "tokens"
        path = tmp / (cfg["file"] + ".jsonl")
        lines = [json.dumps(header)] + [json.dumps(r) for r in history_records(cfg)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if not cfg["cli"]:
            return _report_of_the_library(cfg, path)
        page_path = tmp / "page.html"
        rc, out, err = _cli(["report", str(path), "-o", str(page_path), "--json"])
        if rc != 0:
            if rc == 2 and err.strip() and "Traceback" not in err:
                return {"cls": "refused-ok", "why": err.strip()[-200:]}
            return {"cls": "crash", "why": f"rc {rc}: {err[-300:]}"}
        summary = json.loads(out)
        page = page_path.read_text(encoding="utf-8")
        res = report_findings(cfg, page, summary, path)
        # never overwrite: the page again without --force, or the history itself as the page
        page_path.write_text("mine", encoding="utf-8")
        history = path.read_bytes()
        for target in (page_path, path):
            rc, _, err = _cli(["report", str(path), "-o", str(target)])
            kept = page_path.read_text(encoding="utf-8") == "mine" and path.read_bytes() == history
            if rc != 2 or not kept or not err.strip():
                why = f"-o {target.name!r} without --force: rc {rc}, kept {kept}: {err[-200:]}"
                return {"cls": "WRONG-SILENT", "why": [why, *res.get("why", [])]}
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_of_the_library(cfg, path):
    """The page and summary of ``report_html`` and ``summary_dict``, the figures left blank."""
    from noisescale.errors import NoiseScaleInputError
    from noisescale.report.data import load_history, report_data, summary_dict
    from noisescale.report.figures import FIGURE_NAMES
    from noisescale.report.html import report_html

    try:
        data = report_data(load_history(path))
    except NoiseScaleInputError as err:
        return {"cls": "refused-ok", "why": str(err)[-200:]}
    summary = json.loads(json.dumps(summary_dict(data), allow_nan=False))
    page = report_html(data, dict.fromkeys(FIGURE_NAMES, b""))
    return report_findings(cfg, page, summary, path)


def _first(pattern, text):
    m = re.search(pattern, text)
    return m.groups() if m else None


def report_findings(cfg, page, summary, path):
    bad = []
    p = parse(page)
    bad += markup_findings(p, cfg["groups"] + [cfg["file"]], scripts=1, pngs=cfg["cli"])
    figures = [a for t, a in p.tags if t == "img"]
    if len(figures) != 5:
        bad.append(("WRONG-SILENT", f"{len(figures)} figures, not 5"))
    # the title and the groups: exactly the user's strings
    title = "".join(p.texts_in("title"))
    if title != f"noisescale report: {path.name}":
        bad.append(("WRONG-SILENT", f"title {title!r}, the file {path.name!r}"))
    names = p.texts_in("td", **{"class": "name"})
    if [g["name"] for g in summary["groups"]] != list(cfg["groups"]) or names != list(
        cfg["groups"]
    ):
        bad.append(("WRONG-SILENT", f"groups shown {names!r}, given {cfg['groups']!r}"))
    # inline data
    m = re.search(r"const DATA = (.*?);\n", "".join(p.scripts))
    run = summary["run"]
    if not m:
        bad.append(("WRONG-SILENT", "no DATA in the script"))
    else:
        data = json.loads(m.group(1))
        want = {"sMin": run["s_min"], "eMin": run["e_min"], "gamma": summary["gamma"]}
        if data != want:
            bad.append(("WRONG-SILENT", f"DATA {data} != JSON {want}"))
    text = " ".join(p.text().split())
    unit = summary["unit"]
    # summary numbers
    got = _first(r"It went from (\S+) to (\S+) (\w+)", text)
    if got is None:
        bad.append(("WRONG-SILENT", "no 'It went from' sentence"))
    else:
        if not same_shown(got[0], summary["b_simple_first"], g4):
            bad.append(("WRONG-SILENT", f"first B_simple {got[0]} vs {summary['b_simple_first']}"))
        if not same_shown(got[1], summary["b_simple_last"], g4):
            bad.append(("WRONG-SILENT", f"last B_simple {got[1]} vs {summary['b_simple_last']}"))
        if got[2] != unit:
            bad.append(("WRONG-SILENT", f"unit {got[2]} vs {unit}"))
    lo, hi = summary["b_simple_last_interval"]
    interval = _first(r"\(interval (\S+)–(\S+)\)", text)
    if (lo is not None and hi is not None) != (interval is not None):
        bad.append(("WRONG-SILENT", f"interval shown {interval} for {lo, hi}"))
    elif interval and not (same_shown(interval[0], lo, g4) and same_shown(interval[1], hi, g4)):
        bad.append(("WRONG-SILENT", f"interval {interval} vs {lo, hi}"))
    b_last, t = summary["b_simple_last"], summary["tokens_per_example"]
    if unit == "tokens" and t:
        other = _first(r"— (\S+) sequences of (\S+) tokens on average", text)
        if other is None or not same_shown(other[0], b_last / t, g4):
            bad.append(("WRONG-SILENT", f"in sequences {other} vs {b_last / t}"))
    if unit == "examples" and t:
        other = _first(r"— (\S+) tokens at (\S+) tokens per example", text)
        if other is None or not same_shown(other[0], b_last * t, g4) or other[1] != f"{t:.3g}":
            bad.append(("WRONG-SILENT", f"in tokens {other} vs {b_last * t} at {t}"))
    if cfg["tokens"] and t != cfg["tokens_per_example"]:
        bad.append(("WRONG-SILENT", f"tokens per example {t} vs {cfg['tokens_per_example']}"))
    s_min, e_min, gamma = run["s_min"], run["e_min"], summary["gamma"]
    shown_crit = _first(r"= (\S+): the run's progress needs", text)
    if shown_crit is None or not same_shown(shown_crit[0].rstrip(":"), e_min / s_min, g4):
        bad.append(("WRONG-SILENT", f"B_crit {shown_crit} vs E_min/S_min {e_min / s_min}"))
    mins = _first(r"S\s?min = (\S+) steps .*?E\s?min = (\S+) \w+ \(tiny", text)
    if mins is None:
        bad.append(("WRONG-SILENT", "no S_min/E_min sentence"))
    else:
        for shown, v, name in ((mins[0], s_min, "S_min"), (mins[1], e_min, "E_min")):
            if not same_shown(shown, v, count):
                bad.append(("WRONG-SILENT", f"{name} {shown} vs {v}"))
            if shown == "0" and v > 0:
                bad.append(("WRONG-SILENT", f"{name} = {v!r} > 0 shown as 0"))
    gam = _first(r"has γ = (\S+) on this", text)
    if gam is None or not same_shown(gam[0], gamma, lambda x: f"{x:.3f}"):
        bad.append(("WRONG-SILENT", f"γ {gam} vs {gamma}"))
    sq = _first(r"both 1 \+ √γ = (\S+) times", text)
    if sq is None or not same_shown(sq[0].rstrip("."), 1 + math.sqrt(gamma), g4):
        bad.append(("WRONG-SILENT", f"1+√γ {sq} vs {1 + math.sqrt(gamma)}"))
    same = summary["adaptive"]["same_examples_steps"]
    fewer = _first(r"\((\S+)% fewer; r = (\S+)\)", text)
    if run["batch_size"] is not None and run["examples"] == run["batch_size"] * run["steps"]:
        # one batch size B, E = B·S: the adaptive schedule with as many examples needs
        # S_min + γ·E_min/B steps (eq. D.4 with E/E_min − 1 = B·S_min/E_min)
        truth = s_min + gamma * e_min / run["batch_size"]
        shown = _first(r"it would have needed (\S+) steps instead", text)
        if shown is None or not (
            same_shown(shown[0], truth, count) or _count_close(shown[0], truth, count)
        ):
            bad.append(("WRONG-SILENT", f"adaptive steps at the run's examples {shown} vs {truth}"))
    bad += same_examples_by_hand(cfg, summary)
    if same is not None:
        truth = 100 * (1 - same / run["steps"])
        if fewer is None or not same_shown(fewer[0], truth, lambda x: f"{x:.1f}"):
            bad.append(("WRONG-SILENT", f"% fewer {fewer} vs {truth}"))
    # the regime by the paper's thirds (§2.2), against the last B_simple
    if run["batch_size"] is not None:
        b, bn = run["batch_size"], b_last
        want = "small-batch" if b < bn / 3 else "large-batch" if b > 3 * bn else "balanced"
        shown = _first(r"that is the (\S+) regime", text)
        if shown is None or shown[0] != want:
            bad.append(("WRONG-SILENT", f"regime {shown} at B={b}, B_simple={bn}: {want}"))
    # the costs table: eq. 2.11 and D.4 by hand
    bad += cost_rows(page, summary)
    # nan / inf as numbers, positive counts as 0
    for word in re.findall(r"(?<![\w.])(nan|inf|-inf)(?![\w])", text):
        bad.append(("WRONG-SILENT", f"{word!r} shown as a number"))
    # the calculator in node
    if NODE and m:
        bad += calculator(p, summary, cfg)
    return _classed(bad)


def same_examples_by_hand(cfg, summary):
    """The adaptive schedule with as many examples as the run, by hand from the draws: eq. D.1
    at every whole step between the first and last estimate (each step's own B — skipped records
    hold theirs —, B_simple interpolated between estimates, the trapezoid, as
    theory.run_integrals documents), the run's examples in that rule (the count less
    (B_last − B_first)/2), and E − E_min as ∫B ds (not the count less E_min: round-off where
    B ≪ B_simple; until 2026-12-07 the report took the count, 1.4e-8 steps for 45.8, a review
    of this fuzzer)."""
    n, batch, a, tau = cfg["n_steps"], cfg["batch"], cfg["a"], cfg["tau"]
    beside = cfg["tokens"] and cfg.get("tokens_beside", False)
    t_per = cfg["tokens_per_example"] if cfg["tokens"] and not beside else 1.0
    steps = np.arange(n)
    true_b = np.array([batch * (1 + (t % 3 == 2)) if cfg["varying"] else batch for t in steps])
    true_b = true_b * t_per
    noise = np.array([a * (1.0 + t / tau) if tau is not None else a for t in steps]) * t_per
    est = [
        t
        for t in steps
        if t >= cfg["warmup"]
        and t not in cfg["skipped"]
        and not (cfg["kind"] == "lost" and t == n - 1)
    ]
    run, same = summary["run"], summary["adaptive"]["same_examples_steps"]
    if len(est) < 2 or (run["first_step"], run["last_step"]) != (est[0], est[-1]):
        return []
    grid = np.arange(est[0], est[-1] + 1)
    # every record holds its batch size, those without an estimate (skipped) too: B is the
    # step's own, B_simple interpolated between the estimates around it (since 2026-12-08;
    # until then the report dropped such records and interpolated their batch sizes too, as
    # this oracle did)
    b = true_b[grid].astype(float)
    bn = np.interp(grid, est, noise[est])
    ds = b / (b + bn)

    def trap(f):
        return float(np.sum((f[1:] + f[:-1]) / 2))

    s_min, e_min, root, above = trap(ds), trap(bn * ds), trap(np.sqrt(bn) * ds), trap(b * ds)
    if np.array_equal(b, true_b[grid]):
        over = above
    else:  # steps without an estimate whose batch was not the interpolated one
        used = float(true_b[grid[1:]].sum()) - (true_b[grid[-1]] - true_b[grid[0]]) / 2
        unrecorded = used - e_min - above
        # the report's UNRECORDED_SHARE (1e-3 of E − E_min): beyond it refused, not priced
        if abs(unrecorded) > 2e-3 * above:
            if same is not None:
                return [("WRONG-SILENT", f"adaptive steps {same} rest on {unrecorded} unrecorded")]
            return []
        if abs(unrecorded) > 0.5e-3 * above:
            return []
        over = used - e_min
    truth = s_min + root * root / over
    if same is None or not abs(same - truth) <= 1e-6 * truth:
        return [("WRONG-SILENT", f"adaptive steps at the run's examples {same} vs {truth}")]
    return []


def cost_rows(page, summary):
    """The first ``table.costs`` (what a batch size would have cost) against eq. 2.11, D.4."""
    bad = []
    parser = _Rows()
    parser.feed(page.split('<table class="costs">', 1)[1].split("</table>", 1)[0])
    cells_by_row = parser.rows
    run = summary["run"]
    s_min, e_min, gamma = run["s_min"], run["e_min"], summary["gamma"]
    b_crit = e_min / s_min
    costs = summary["fixed_batch_costs"]
    if len(cells_by_row) != len(costs):
        return [("WRONG-SILENT", f"{len(cells_by_row)} cost rows, JSON {len(costs)}")]
    for cells, c in zip(cells_by_row, costs, strict=True):
        b = c["batch_size"]
        steps = s_min + e_min / b
        truth = [
            (cells[1], steps, count, "steps"),
            (cells[2], b * steps, count, "examples"),
            (cells[3], 1 + b_crit / b, g4, "S/Smin"),
            (cells[4], 1 + b / b_crit, g4, "E/Emin"),
        ]
        ad_e = e_min + gamma * s_min * b
        truth.append((cells[6].split(" (")[0], ad_e, count, "adaptive E"))
        # eq. D.4 in closed form is finite at every B > 0: None would be a number lost
        if c["adaptive_steps_same_examples"] is None:
            bad.append(("WRONG-SILENT", f"B={b} adaptive S: None for {s_min + gamma * e_min / b}"))
        truth.append((cells[5].split(" (")[0], s_min + gamma * e_min / b, count, "adaptive S"))
        for shown, v, fmt, name in truth:
            # the JSON's own value rounds the same, or this is one count off at a .5 boundary
            if not same_shown(shown, v, fmt) and not _count_close(shown, v, fmt):
                bad.append(("WRONG-SILENT", f"B={b} {name}: {shown} vs {v}"))
            if shown == "0" and v > 0:
                bad.append(("WRONG-SILENT", f"B={b} {name} = {v!r} > 0 shown as 0"))
    return bad


def _count_close(shown, v, fmt):
    # eq. 2.11 summed step by step differs from S_min + E_min/B by round-off of the sums:
    # a relative 1e-9 (sums of up to 1e3 terms) can move a count across its .5
    if fmt is not count or not math.isfinite(v):
        return False
    try:
        return abs(int(shown.replace(",", "")) - v) <= 0.5 + 1e-9 * abs(v)
    except ValueError:
        return False


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def calculator(p, summary, cfg):
    script = p.scripts[0]
    run = summary["run"]
    s_min, e_min, gamma = run["s_min"], run["e_min"], summary["gamma"]
    bad = []
    for b in cfg["calc_b"]:
        got = run_node(script, {"report-input-batch-size": repr(b)})
        if "error" in got:
            return [("crash", f"node: {got['error'][:200]}")]
        if "report-readout-steps" not in got["values"]:
            return [("crash", f"no readouts in node: {got}"[:300])]
        steps = s_min + e_min / b
        ad = s_min + gamma * e_min / b
        truth = {
            "report-readout-steps": steps,
            "report-readout-examples": b * steps,
            "report-readout-adaptive-steps": ad,
            "report-readout-saved": 100 * (1 - ad / steps),
        }
        for k, v in truth.items():
            value = float(got["values"].get(k, "nan"))
            # float64 round-off of a few operations: 10·RTOL relative; the % saved, 100·(1 − a
            # ratio), to 1e-9 absolute (its round-off is ~100·4·2⁻⁵³)
            tol = 1e-9 if k.endswith("saved") else 10 * RTOL * abs(v)
            if not abs(value - v) <= tol:
                bad.append(("WRONG-SILENT", f"calculator {k} at B={b}: {value} vs {v}"))
        shown = got["texts"].get("report-readout-steps")
        if shown != count(steps) and not _count_close(shown or "", steps, count):
            bad.append(("WRONG-SILENT", f"calculator steps text {shown} vs {steps}"))
    return bad


_NODE_STUB = r"""
const inputs = JSON.parse(process.argv[process.argv.length - 1]);
const nodes = {};
function node(id) {
  if (!nodes[id]) nodes[id] = {
    id, value: inputs[id] !== undefined ? inputs[id] : "", textContent: "", attrs: {},
    style: {}, classList: {add(){}, remove(){}, toggle(){}},
    setAttribute(k, v) { this.attrs[k] = v; }, removeAttribute(k) { delete this.attrs[k]; },
    getAttribute(k) { return this.attrs[k]; }, addEventListener() {}, appendChild(c) { return c; },
    replaceChildren() {}, querySelector() { return node("?"); }, querySelectorAll() { return []; },
    set innerHTML(v) { this._html = v; }, get innerHTML() { return this._html || ""; },
  };
  return nodes[id];
}
globalThis.document = {
  getElementById: node, createElementNS: () => node("ns" + Math.random()),
  createElement: () => node("el" + Math.random()), querySelector: () => node("?"),
  querySelectorAll: () => [], addEventListener() {},
};
globalThis.window = globalThis;
try {
  eval(require("fs").readFileSync(0, "utf8"));
  const values = {}, texts = {};
  for (const [id, n] of Object.entries(nodes)) {
    if (n.attrs["data-value"] !== undefined) values[id] = n.attrs["data-value"];
    texts[id] = n.textContent;
  }
  console.log(JSON.stringify({values, texts}));
} catch (e) { console.log(JSON.stringify({error: String(e && e.stack || e)})); }
"""


def run_node(script, inputs):
    res = subprocess.run(
        [NODE, "-e", _NODE_STUB, json.dumps(inputs)],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": res.stderr[:400] or res.stdout[:400]}


def check_hardware(cfg, seed):
    from noisescale.errors import NoiseScaleInputError
    from noisescale.hardware.page import recommendation_html
    from noisescale.hardware.profile import ThroughputPoint, ThroughputProfile
    from noisescale.hardware.recommend import recommend_batch_size

    rng = random.Random(seed + 1)
    alpha, beta = 10.0 ** rng.uniform(-3, -1), 10.0 ** rng.uniform(-6, -3)
    points = [ThroughputPoint(b, (alpha + beta * b,)) for b in (1, 2, 4, 8, 16, 32)]
    profile = ThroughputProfile.from_points(
        points,
        device={"type": "cuda", "name": cfg["hw_device"]},
        model={"name": cfg["hw_model"], "param_bytes": 4e6},
        max_batch_size=rng.choice([None, 64, 1024]),
    )
    price = None if cfg["hw_currency"] is None else rng.uniform(0.5, 4)
    target = rng.choice([{}, {"s_min": 1000.0}])
    b_noise = cfg["hw_b_noise"]
    try:
        rec = recommend_batch_size(
            b_noise,
            profile,
            devices=rng.choice([(1,), (1, 2, 8)]),
            price_per_gpu_hour=price,
            currency=cfg["hw_currency"] if price else None,
            **target,
        )
    except NoiseScaleInputError as err:
        return {"cls": "refused-ok", "why": str(err)[:200]}
    page = recommendation_html(rec, profile)
    p = parse(page)
    bad = markup_findings(p, [cfg["hw_device"], cfg["hw_model"]], scripts=0)
    h1 = "".join(t for path, _, t in p.texts if "h1" in path)
    want = f"Batch size for Bnoise = {b_noise:g} examples: {cfg['hw_model']} on {cfg['hw_device']}"
    if h1 != want:
        bad.append(("WRONG-SILENT", f"heading {h1!r} vs {want!r}"))
    rows = _Rows()
    rows.feed(page.split("<h2>Pareto front</h2>", 1)[1])
    front = rec.pareto_front
    if len(rows.rows) != len(front):
        bad.append(("WRONG-SILENT", f"{len(rows.rows)} rows for a front of {len(front)}"))
    for cells, c in zip(rows.rows, front, strict=False):
        b = c.batch_size
        for shown, v, name in (
            (cells[3], 1 + b_noise / b, "S/Smin"),
            (cells[4], 1 + b / b_noise, "E/Emin"),
        ):
            if not same_shown(shown, v, lambda x: f"{x:.3g}"):
                bad.append(("WRONG-SILENT", f"B={b} {name}: {shown} vs {v}"))
        if cells[0] != str(b):
            bad.append(("WRONG-SILENT", f"B {cells[0]} vs {b}"))
        if not rec.relative and price and cfg["hw_currency"] not in cells[7]:
            bad.append(("WRONG-SILENT", f"cost {cells[7]!r} without {cfg['hw_currency']!r}"))
    return _classed(bad)


def check_branch(cfg, seed):
    from noisescale.branch.page import branch_html

    page = branch_html([], {}, title=cfg["branch_title"], warnings=[cfg["branch_note"]])
    p = parse(page)
    bad = markup_findings(p, [cfg["branch_title"], cfg["branch_note"]], scripts=0)
    title = "".join(p.texts_in("title"))
    if title != f"noisescale branch: {cfg['branch_title']}":
        bad.append(("WRONG-SILENT", f"title {title!r}"))
    h1 = "".join(p.texts_in("h1"))
    if h1 != f"Branched critical batch size: {cfg['branch_title']}":
        bad.append(("WRONG-SILENT", f"heading {h1!r}"))
    if p.texts_in("li")[:1] != [cfg["branch_note"]]:
        bad.append(("WRONG-SILENT", f"note {p.texts_in('li')[:1]!r}"))
    return _classed(bad)


_SWEEP = {}


def check_sweep(cfg, seed):
    from noisescale.sweep import critical_batch_sizes
    from noisescale.sweep.plot import pareto_html
    from noisescale.sweep.synthetic import SyntheticModel

    rng = random.Random(seed + 2)
    goals = sorted(rng.sample([0.5, 0.3, 0.2, 0.1], rng.randint(1, 3)), reverse=True)
    key = tuple(goals)
    if key not in _SWEEP:
        runs = SyntheticModel().runs([8, 32, 128, 512, 2048], steps=4000, every=4)
        _SWEEP[key] = critical_batch_sizes(runs, goals, decay=0.0)
    results = _SWEEP[key]
    page = pareto_html(results, title=cfg["sweep_title"])
    p = parse(page)
    bad = markup_findings(p, [cfg["sweep_title"]], scripts=0)
    for name in ("title", "h1"):
        shown = "".join(p.texts_in(name))
        if shown != cfg["sweep_title"]:
            bad.append(("WRONG-SILENT", f"{name} {shown!r} vs {cfg['sweep_title']!r}"))
    rows = _Rows()
    rows.feed(page.split("<th>notes</th></tr>", 1)[1])
    for cells, r in zip(rows.rows, results, strict=False):
        if cells[0].split(" ", 1)[-1] != f"{r.goal:.4g}":
            bad.append(("WRONG-SILENT", f"goal {cells[0]!r} vs {r.goal}"))
    if len(rows.rows) != len(results):
        bad.append(("WRONG-SILENT", f"{len(rows.rows)} rows, {len(results)} goals"))
    return _classed(bad)


def check_explore(cfg, seed):
    from noisescale.errors import NoiseScaleInputError
    from noisescale.report.explore import explore_html

    bn, b = cfg["explore_b_noise"], cfg["explore_batch"]
    try:
        page = explore_html(bn, b)
    except NoiseScaleInputError as err:
        if b is not None and not 1 <= b <= 2**30:
            return {"cls": "refused-ok", "why": str(err)[:200]}
        return {"cls": "FALSE-REFUSAL", "why": str(err)[:200]}
    if b is not None and not 1 <= b <= 2**30:
        return {"cls": "WRONG-SILENT", "why": f"batch {b} outside [1, 2^30] not refused"}
    p = parse(page)
    bad = markup_findings(p, [], scripts=1)
    m = re.search(r"const INITIAL = (.*?);\n", "".join(p.scripts))
    if m:
        init = json.loads(m.group(1))
        if init["bNoise"] != bn:
            bad.append(("WRONG-SILENT", f"bNoise {init['bNoise']} vs {bn}"))
    if NODE:
        bad += explore_readouts(p, bn)
    return _classed(bad)


def explore_readouts(p, bn):
    """The readouts at random batch sizes against eq. 2.6/2.7/2.11 (README's explorer)."""
    bad = []
    script = "\n".join(p.scripts)
    inputs = {
        a["id"]: a.get("value", "")
        for t, a in map(lambda x: (x[0], dict(x[1])), p.tags)
        if t == "input" and "id" in a
    }
    got = run_node(script, inputs)
    if "error" in got:
        return [("crash", f"node: {got['error'][:300]}")]
    vals = got["values"]
    if "readout-steps-over-min" not in vals:  # (the stub document ran nothing: a fuzzer fault)
        return [("crash", f"no readouts in node: {got}"[:300])]
    b = float(vals.get("readout-batch-size", "nan"))
    truth = {
        "readout-noise-scale": bn,
        "readout-b-over-b-noise": b / bn,
        "readout-lr-over-max": 1 / (1 + bn / b),  # eq. 2.6
        "readout-loss-improvement-over-max": 1 / (1 + bn / b),  # eq. 2.7
        "readout-steps-over-min": 1 + bn / b,  # eq. 2.11
        "readout-examples-over-min": 1 + b / bn,
    }
    for k, v in truth.items():
        if k not in vals:
            continue
        x = float(vals[k])
        if not abs(x - v) <= 1e-9 * abs(v):
            bad.append(("WRONG-SILENT", f"{k} {x} vs {v} (B={b}, B_noise={bn})"))
    regime = got["texts"].get("readout-regime", "")
    want = "small" if b < bn / 3 else "large" if b > 3 * bn else "balanced"
    if want not in regime:
        bad.append(("WRONG-SILENT", f"regime {regime!r} at B/B_noise {b / bn}: {want}"))
    return bad


def _classed(bad):
    if not bad:
        return {"cls": "ok"}
    order = ("INJECTED", "WRONG-SILENT", "NOT-SELF-CONTAINED", "MALFORMED", "crash")
    cls = min((c for c, _ in bad), key=order.index)
    return {"cls": cls, "why": [w for _, w in bad][:6]}


# --- one seed ----------------------------------------------------------------------------------


def _guard(fn):
    from noisescale.errors import NoiseScaleInputError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except NoiseScaleInputError as err:
        return {"cls": "FALSE-REFUSAL", "exc": f"{type(err).__name__}: {str(err)[:300]}"}
    except Exception as err:
        return {"cls": "crash", "exc": f"{type(err).__name__}: {str(err)[:300]}"}


def check_seed(seed, checks=CHECKS, override=None):
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    record = {"seed": seed, "cfg": cfg, "checks": {}}
    run = {
        "report": check_report,
        "hardware": check_hardware,
        "branch": check_branch,
        "sweep": check_sweep,
        "explore": check_explore,
    }
    for name in checks:
        record["checks"][name] = _guard(lambda name=name: run[name](cfg, seed))
    return record


def findings(record):
    return [(n, r) for n, r in record["checks"].items() if r["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("kind", "n_steps", "batch", "varying", "a", "tau", "g2_scale", "tokens", "groups")
    return f"seed {record['seed']}: " + " ".join(f"{k}={cfg[k]!r}" for k in keys)


def main(argv=None):
    from fuzz_runner import (
        _seeds,
        check_parser,
        print_class_table,
        print_findings,
        run_check_seeds,
    )

    parser = check_parser(__doc__, "0:40")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks")
    args = parser.parse_args(argv)
    checks = tuple(args.checks.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, _ = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check_seed(seed, checks, override),
        findings, args.jsonl, args.verbose, describe, width=9, limit=600,
    )  # fmt: skip
    print_class_table(table, [c for c in CHECKS if c in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    return print_findings(found, describe, limit=600)


if __name__ == "__main__":
    raise SystemExit(main())
