"""The classroom assignments (tools/build_assignments.py, book/instructors.md) grade as the book's
exercises say, show students no solution and no hidden test, and never drift from the chapters.

Every assignment is built once into a temporary directory; then `otter run` (otter-grader's grader,
without Docker) grades three submissions of each: the solution notebook, the blank student notebook,
and the solution with one planted wrong answer: three kernels at a time per assignment.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
import yaml

from lora_ref import exercises

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_assignments", ROOT / "tools" / "build_assignments.py")
ba = sys.modules["build_assignments"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ba)

# otter imports traitlets code that warns about its own style; nothing here to act on.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:traitlets"), pytest.mark.slow]   # otter runs

OTTER = Path(sys.executable).with_name("otter")
CHAPTERS = [p.stem for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
            if "```{exercise}" in p.read_text()]
# The chapters whose assignment can be built; a chapter without its spec fails one test below, by name.
SPECCED = [c for c in CHAPTERS if (ROOT / "assignments" / f"{c}.yml").exists()]
ROLE = re.compile(r"\{[a-z:-]+\}`([^`]+)`")

# One planted wrong answer per assignment: (exercise, function body, which test catches it). "hidden":
# the answer passes the public test (the chapter's own values) and fails a hidden one. HARDCODED is the
# book's answer typed in as a literal, as a student who copies the solution dropdown would. A chapter
# not listed gets HARDCODED on its first exercise.
HARDCODED = object()
PLANTED = {
    # The library's own function: right at every value, caught by the hidden test of the source.
    "01_cost_of_finetuning": ("ex-ch01-70b",
                              "return budget.lora_param_count(budget.load_config(model), r, target_modules)",
                              "hidden"),
    "02_forward_pass": ("ex-ch02-crossover", HARDCODED, "hidden"),
    "03_scaling": ("ex-ch03-exponent", HARDCODED, "hidden"),
    # Adam's exponent for every optimiser: right for the question (Adam), wrong under SGD.
    "04_initialisation": ("ex-ch04-exponent",
                          'e = {"alpha/r": -1, "alpha/sqrt(r)": -0.5}[rule]\n'
                          'v = 0 if init == "kaiming" else -2\n'
                          "return e + 1 + v / 2",
                          "hidden"),
    # NF4 without double quantisation: wrong at the question's block size already.
    "08_qlora": ("ex-ch08-bits", "return 4 + 32 / blocksize", "public"),
}


def _spec_of(chapter):
    return yaml.safe_load((ROOT / "assignments" / f"{chapter}.yml").read_text())


def _notebook_name(chapter):
    return f"{chapter}_assignment.ipynb"


def _digest(paths):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# --------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{chapter: its output directory}, all built into one temporary directory."""
    out = tmp_path_factory.mktemp("assignments")
    book_files = sorted((ROOT / "notebooks").glob("*")) + sorted(p for p in (ROOT / "book").rglob("*") if p.is_file())
    before = _digest(book_files)
    result = {c: ba.build(c, out, run_tests=False) for c in SPECCED}
    assert _digest(book_files) == before, "building the assignments changed the book or a chapter"
    return result


def _function_cell_index(nb, function):
    hits = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(f"def {function}(")]
    assert len(hits) == 1, f"expected one cell defining {function}"
    return hits[0]


def _solution_namespace(built_dir, chapter):
    """The solution notebook's setup and answer cells, executed here: {name: object}."""
    nb = nbformat.read(built_dir / "autograder" / _notebook_name(chapter), as_version=4)
    ns = {}
    for c in nb.cells:
        if c.cell_type == "code" and (c.source.startswith("from lora_ref import exercises as ex")
                                      or c.source.startswith("def ")):
            exec(c.source, ns)
    return ns


def _book_values(chapter):
    return {e.label: e for e in ba.read_chapter(ROOT / "notebooks" / f"{chapter}.ipynb").exercises}


def _planted_notebook(built_dir, chapter, dest):
    """The solution notebook with one answer replaced; returns (dest, question name, caught by)."""
    spec = _spec_of(chapter)
    label, body, caught_by = PLANTED.get(chapter, (next(iter(spec["questions"])), HARDCODED, "hidden"))
    q, e = spec["questions"][label], _book_values(chapter)[label]
    if body is HARDCODED:
        answer = _solution_namespace(built_dir, chapter)[q["function"]](**{a: e.values[a] for a in q["args"]})
        body = f"return {answer.tolist() if hasattr(answer, 'tolist') else answer!r}"
    nb = nbformat.read(built_dir / "autograder" / _notebook_name(chapter), as_version=4)
    cell = nb.cells[_function_cell_index(nb, q["function"])]
    tail = cell.source[cell.source.index("# The chapter's question"):]
    cell.source = (f"def {q['function']}({', '.join(q['args'])}):\n"
                   + "".join(f"    {line}\n" for line in body.splitlines()) + "\n\n" + tail)
    nbformat.write(nb, dest)
    return dest, ba.question_name(label), caught_by


def _otter_run(autograder_zip, submission, out_dir):
    out_dir.mkdir(parents=True)
    proc = subprocess.run([str(OTTER), "run", "--no-logo", "-a", str(autograder_zip), "-o", str(out_dir),
                           str(submission)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    scores = {t["name"]: (t["score"], t["max_score"]) for t in results["tests"] if t["name"] != "Public Tests"}
    public = next((t["output"] for t in results["tests"] if t["name"] == "Public Tests"), "")
    return scores, public


@pytest.fixture(scope="module")
def graded(built, tmp_path_factory):
    """graded(chapter) -> {"solution" | "blank" | "planted": (scores {question: (score, max)}, public
    output)}, and the planted question's (name, caught by). Each chapter's three runs go in parallel."""
    work, cache = tmp_path_factory.mktemp("graded"), {}

    def grade(chapter):
        if chapter not in cache:
            d, out = built[chapter], work / chapter
            zip_path = d / "autograder" / f"{chapter}-autograder.zip"
            out.mkdir()
            planted, name, caught_by = _planted_notebook(d, chapter, out / _notebook_name(chapter))
            submissions = {"solution": d / "autograder" / _notebook_name(chapter),
                           "blank": d / "student" / _notebook_name(chapter), "planted": planted}
            with ThreadPoolExecutor(max_workers=3) as pool:
                futures = {kind: pool.submit(_otter_run, zip_path, path, out / f"{kind}-results")
                           for kind, path in submissions.items()}
                cache[chapter] = ({kind: f.result() for kind, f in futures.items()}, (name, caught_by))
        return cache[chapter]

    return grade


# --------------------------------------------------------------------------- grading


def _n_autograded(chapter):
    """The exercises and the plot questions (the student's matplotlib figure, read back by the Axes)."""
    spec = _spec_of(chapter)
    return len(spec["questions"]) + len(spec.get("plots", []))


@pytest.mark.parametrize("chapter", SPECCED)
def test_solution_notebook_scores_full_marks_on_every_autograded_question(graded, chapter):
    (scores, _), n_graded = graded(chapter)[0]["solution"], _n_autograded(chapter)
    assert len(scores) == n_graded, scores
    assert all(score == best > 0 for score, best in scores.values()), scores


@pytest.mark.parametrize("chapter", SPECCED)
def test_blank_student_notebook_scores_zero_on_every_question(graded, chapter):
    scores, _ = graded(chapter)[0]["blank"]
    assert len(scores) == _n_autograded(chapter), scores
    assert all(score == 0 for score, _ in scores.values()), scores


@pytest.mark.parametrize("chapter", SPECCED)
def test_a_planted_wrong_answer_loses_exactly_its_questions_points(graded, chapter):
    results, (name, caught_by) = graded(chapter)
    scores, public = results["planted"]
    assert scores[name][0] == 0, scores
    assert all(score == best for q, (score, best) in scores.items() if q != name), scores
    passed_public = f"{name} results: All test cases passed!" in public
    assert passed_public == (caught_by == "hidden"), public


# --------------------------------------------------------------------------- what students see


def _student_texts(student_dir):
    """{where: text} for every file of the student version, with the public tests packed in the notebook."""
    texts = {str(p.relative_to(student_dir)): p.read_text() for p in student_dir.rglob("*") if p.is_file()}
    for where, text in list(texts.items()):
        m = re.search(r'PUBLIC_TESTS = \\"([A-Za-z0-9+/=]+)\\"', text)
        if m:
            with zipfile.ZipFile(io.BytesIO(base64.b64decode(m[1]))) as zf:
                for name in zf.namelist():
                    texts[f"{where}:PUBLIC_TESTS/{name}"] = zf.read(name).decode()
    return texts


def _code_lines_outside_checker_calls(cell):
    """The stripped lines of a solution cell, less those of a checker call ``ex.…(…)``, which
    the student version shows too (with the answer left out), continuation lines included."""
    out, depth = [], 0
    for line in cell.splitlines():
        if depth == 0 and "ex." not in line:
            out.append(line.strip())
            continue
        depth = max(0, depth + line.count("(") - line.count(")"))
    return out


def leaks(student_dir, chapter):
    """Solutions and hidden tests found in a student version: [(what, needle, where)]."""
    spec, book = _spec_of(chapter), _book_values(chapter)
    needles = [("marker", m) for m in ("BEGIN SOLUTION", "END SOLUTION", "hidden=True", "hidden: true",
                                        "test_other_values", "test_computes_the_answer_itself",
                                        "otter_assign_solution_cell", "The book's solution", "Model answer")]
    for label, q in spec["questions"].items():
        for line in q["solution"].splitlines():
            code = line.split("#")[0].strip()
            if len(code) >= 10:
                needles.append(("solution line", code))
        for values in q["hidden"]:
            full = {**book[label].values, **values}
            needles.append(("hidden test values",
                            f"{q['function']}({', '.join(f'{a}={full[a]!r}' for a in q['args'])})"))
    for plot in spec.get("plots", []):
        needles += [("plot solution line", line.split("#")[0].strip()) for line in plot["solution"].splitlines()
                    if len(line.split("#")[0].strip()) >= 10]
        needles += [("hidden plot values", ", ".join(f"{k}={v!r}" for k, v in values.items()))
                    for values in plot["hidden"]]
    for e in book.values():
        needles.append(("the book's solution text", ROLE.sub(r"`\1`", e.solution_text)[:60]))
        needles += [("the book's solution code", line) for cell in e.solution_code
                    for line in _code_lines_outside_checker_calls(cell) if len(line) >= 10]
    texts = _student_texts(student_dir)
    found = []
    for what, needle in needles:
        found += [(what, needle, where) for where, text in texts.items()
                  if needle in text or json.dumps(needle, ensure_ascii=False)[1:-1] in text]
    return found


@pytest.mark.parametrize("chapter", SPECCED)
def test_student_version_has_no_solution_and_no_hidden_test(built, chapter):
    found = leaks(built[chapter] / "student", chapter)
    assert not found, "\n".join(f"{what} {needle!r} in {where}" for what, needle, where in found)


def test_leak_search_finds_a_solution_line_and_a_hidden_test(built, tmp_path):
    chapter = SPECCED[0]
    copy = tmp_path / "student"
    shutil.copytree(built[chapter] / "student", copy)
    ag_tests = built[chapter] / "autograder" / "tests"
    shutil.copy(next(ag_tests.glob("*.py")), copy / "tests")          # a test file with its hidden cases
    nb_path = copy / _notebook_name(chapter)
    nb = nbformat.read(nb_path, as_version=4)
    q = next(iter(_spec_of(chapter)["questions"].values()))
    solution_line = next(line.strip() for line in q["solution"].splitlines() if len(line.split("#")[0].strip()) >= 10)
    nb.cells.append(nbformat.v4.new_code_cell(solution_line))
    nbformat.write(nb, nb_path)
    kinds = {what for what, _, _ in leaks(copy, chapter)}
    assert {"solution line", "hidden test values", "marker"} <= kinds, kinds


@pytest.mark.parametrize("chapter", SPECCED)
def test_student_notebook_first_installs_lora_ref_and_the_pinned_otter(built, chapter, monkeypatch, capsys):
    """Cell 0 is the chapter's install cell plus otter-grader at requirements.txt's pin; run where neither
    package is installed (a fresh Colab), it calls pip for both."""
    nb = nbformat.read(built[chapter] / "student" / _notebook_name(chapter), as_version=4)
    chapter_cell0 = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4).cells[0].source
    pin = re.search(r"^otter-grader==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert pin and pin[1] == ba.OTTER_VERSION
    assert nb.cells[0].source.startswith(chapter_cell0)
    calls, find_spec = [], importlib.util.find_spec
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("lora_ref", "otter") else find_spec(name, *a))
    exec(nb.cells[0].source, {})
    installed = [cmd[-1] for cmd in calls if cmd[1:4] == ["-m", "pip", "install"]]
    assert len(installed) == 2 and installed[0].startswith("lora_ref"), installed
    assert installed[1] == f"otter-grader=={pin[1]}", installed


def test_grader_check_works_with_the_notebook_alone_as_in_colab(built, tmp_path, monkeypatch):
    """Colab opens the notebook without its tests/ folder: the init cell unpacks the public tests."""
    chapter = SPECCED[0]
    nb = nbformat.read(built[chapter] / "student" / _notebook_name(chapter), as_version=4)
    init = next(c.source for c in nb.cells if c.cell_type == "code" and "grader = otter.Notebook" in c.source)
    monkeypatch.chdir(tmp_path)                                        # no tests/ here
    ns = _solution_namespace(built[chapter], chapter)
    exec(init, ns)
    assert sorted(p.name for p in (tmp_path / "tests").glob("*.py")) == \
        sorted(p.name for p in (built[chapter] / "student" / "tests").glob("*.py"))
    for label in _spec_of(chapter)["questions"]:
        assert ns["grader"].check(ba.question_name(label), global_env=ns).passed_all, label


@pytest.mark.parametrize("chapter", SPECCED)
def test_each_assignment_has_a_free_response_question_with_the_books_model_answer(built, chapter):
    student = nbformat.read(built[chapter] / "student" / _notebook_name(chapter), as_version=4)
    solution = nbformat.read(built[chapter] / "autograder" / _notebook_name(chapter), as_version=4)
    assert any("**Free response** (graded by hand)" in c.source for c in student.cells)
    book = _book_values(chapter)
    for fr in _spec_of(chapter)["free_response"]:
        model = ROLE.sub(r"`\1`", book[fr["answer_from"]].solution_text)
        assert any(model in c.source for c in solution.cells if c.cell_type == "markdown"), fr["name"]


# --------------------------------------------------------------------------- one source of truth


def _chapter_questions(path):
    """[(label, text, checker, keyword values)] read from a chapter notebook."""
    nb = nbformat.read(path, as_version=4)
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for m in re.finditer(r"```\{exercise\}[^\n]*\n(?:(?::[\w-]+:[^\n]*\n)*?:label: *([\w-]+) *\n)"
                             r"(?::[\w-]+:[^\n]*\n)*(.*?)\n```", cell.source, re.S):
            code = next(c for c in nb.cells[i + 1:] if c.cell_type == "code")
            call = next(n for n in ast.walk(ast.parse(code.source))
                        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("ch"))
            out.append((m[1], m[2].strip(), call.func.attr,
                        {k.arg: ast.literal_eval(k.value) for k in call.keywords},
                        [ast.literal_eval(a) for a in call.args[1:]]))
    return out


def _calls_to(source, prefix):
    """{checker: keyword values} of the calls prefix.chNN_...(...) in source."""
    return {n.func.attr: {k.arg: ast.literal_eval(k.value) for k in n.keywords}
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
            and n.func.value.id == prefix and n.func.attr.startswith("ch")}


def drift(chapter_path, student_dir):
    """Where an assignment's questions and public tests disagree with the chapter's exercises."""
    problems = []
    chapter = _chapter_questions(chapter_path)
    nb = nbformat.read(next(student_dir.glob("*.ipynb")), as_version=4)
    headings = [(i, m) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                and (m := re.search(r"^## Question \d+ \(`([\w-]+)`\)", c.source, re.M))]
    if [m[1] for _, m in headings] != [q[0] for q in chapter]:
        problems.append(f"questions {[m[1] for _, m in headings]} != exercises {[q[0] for q in chapter]}")
    for (i, _m), (label, text, checker, kwargs, args) in zip(headings, chapter):
        if ROLE.sub(r"`\1`", text) not in nb.cells[i].source:
            problems.append(f"{label}: the question's text is not the chapter's")
        signature = inspect.signature(getattr(exercises, checker)).bind(None, *args, **kwargs)
        signature.apply_defaults()
        book = dict(list(signature.arguments.items())[1:])
        answer_cell = next(c.source for c in nb.cells[i + 1:] if c.cell_type == "code")
        asked = _calls_to(answer_cell, "ex")
        if asked != {checker: book}:
            problems.append(f"{label}: the notebook checks {asked}, the chapter {checker} {book}")
        test = (student_dir / "tests" / f"{ba.question_name(label)}.py").read_text()
        public = _calls_to(test, "exercises")
        if public != {checker: book}:
            problems.append(f"{label}: the public test checks {public}, the chapter {checker} {book}")
    return problems


@pytest.mark.parametrize("chapter", SPECCED)
def test_assignment_questions_and_public_tests_are_the_chapter_exercises(built, chapter):
    problems = drift(ROOT / "notebooks" / f"{chapter}.ipynb", built[chapter] / "student")
    assert not problems, "\n".join(problems)


def test_drift_check_catches_a_changed_exercise(built, tmp_path):
    chapter = "01_cost_of_finetuning"
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    question = next(i for i, c in enumerate(nb.cells) if "ex.ch01_lora_params(answer" in c.source)
    nb.cells[question].source = nb.cells[question].source.replace("r=8", "r=16")
    nb.cells[question - 1].source = nb.cells[question - 1].source.replace("$r = 8$", "$r = 16$")
    changed = tmp_path / f"{chapter}.ipynb"
    nbformat.write(nb, changed)
    problems = drift(changed, built[chapter] / "student")
    assert any("text is not the chapter's" in p for p in problems), problems
    assert any("the notebook checks" in p for p in problems), problems
    assert any("the public test checks" in p for p in problems), problems


def test_every_chapter_with_exercises_has_an_assignment_spec_and_no_spec_is_orphaned():
    specs = sorted(p.stem for p in (ROOT / "assignments").glob("*.yml"))
    missing = sorted(set(CHAPTERS) - set(specs))
    assert not missing, f"chapters with exercises but no assignments/<chapter>.yml: {missing} (book/instructors.md)"
    assert specs == sorted(CHAPTERS), f"specs without a chapter with exercises: {sorted(set(specs) - set(CHAPTERS))}"


def test_builder_refuses_a_spec_that_misses_an_exercise_or_names_one_the_chapter_lacks(tmp_path):
    chapter = SPECCED[0]
    spec = _spec_of(chapter)
    first = next(iter(spec["questions"]))
    spec["questions"]["ex-ch99-none"] = spec["questions"].pop(first)
    (tmp_path / f"{chapter}.yml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=rf"exercise {first} has no entry(.|\n)*ex-ch99-none is not an exercise"):
        ba.build(chapter, tmp_path / "out", run_tests=False, spec_dir=tmp_path)


@pytest.mark.parametrize("chapter", SPECCED)
def test_hidden_values_reject_the_book_answer_typed_in(built, chapter):
    """Every question's hidden values change its answer: copying the book's number fails a hidden test."""
    spec, book = _spec_of(chapter), _book_values(chapter)
    ns = _solution_namespace(built[chapter], chapter)
    for label, q in spec["questions"].items():
        e = book[label]
        typed_in = ns[q["function"]](**{a: e.values[a] for a in q["args"]})
        checker = getattr(exercises, e.checker)
        assert checker(typed_in, **e.values), label
        assert not all(checker(typed_in, **{**e.values, **v}) for v in q["hidden"]), label


def test_the_downloads_hold_each_student_notebook_and_autograder_and_no_solution(built, tmp_path):
    """What the instructors page offers: one archive, and per chapter the student notebook and the
    autograder zip copied into the built site; never the masters or the solution notebooks."""
    out = next(iter(built.values())).parent
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text("<html></html>")
    archive = ba.pack_downloads(out, SPECCED, site=site)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    for c in SPECCED:
        assert f"{ba.DOWNLOADS}/{c}/student/{c}_assignment.ipynb" in names
        assert f"{ba.DOWNLOADS}/{c}/autograder/{c}-autograder.zip" in names
        assert (site / "assignments" / f"{c}_assignment.ipynb").read_bytes() == \
            (out / c / "student" / f"{c}_assignment.ipynb").read_bytes()
        assert (site / "assignments" / f"{c}-autograder.zip").is_file()
    assert not [n for n in names if "masters" in n or "/autograder/" in n and n.endswith(".ipynb")], names
    assert (site / "assignments" / archive.name).read_bytes() == archive.read_bytes()
    instructors = (ROOT / "book" / "instructors.md").read_text()
    assert f'href="../assignments/{archive.name}"' in instructors
    with pytest.raises(FileNotFoundError, match="make assignments"):
        ba.pack_downloads(tmp_path / "nothing", SPECCED[:1])
