"""Build otter-grader assignments from the chapters' exercises.

    python tools/build_assignments.py                    # every chapter with a spec in assignments/
    python tools/build_assignments.py 03_scaling         # one chapter
    python tools/build_assignments.py --out DIR --no-run-tests --specs DIR

For each chapter with exercises this writes, under _build/assignments/ (never in notebooks/ or book/):

    masters/<chapter>_assignment.ipynb               the otter master notebook (format v1), generated
    <chapter>/student/<chapter>_assignment.ipynb     for students: no solution, no hidden test
    <chapter>/student/tests/*.py                     the public tests (also packed into the notebook)
    <chapter>/autograder/<chapter>_assignment.ipynb  the solution notebook
    <chapter>/autograder/<chapter>-autograder.zip    the autograder: all tests, for otter run / otter grade

One source of truth. A question is an `{exercise}` block of the chapter: its text, the checker its code
cell calls (lora_ref.exercises.chNN_*) and the checker's values are read from the notebook, never
retyped. assignments/<chapter>.yml adds what a course needs and the book does not have: the answer as a
function of the checker's parameters (its solution), the other values the hidden tests try, and the
free-response questions (their model answer is the book's solution text). A chapter exercise without a
spec entry, or a spec entry without an exercise, is an error.
"""

from __future__ import annotations

import argparse
import ast
import base64
import inspect
import io
import re
import shutil
import sys
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "assignments"
NOTEBOOK_DIR = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "_build" / "assignments"
OTTER_VERSION = "7.0.0"                     # = requirements.txt; the student notebook installs this one

EXERCISE_RE = re.compile(r"```\{exercise\}[^\n]*\n(?P<options>(?::[\w-]+:[^\n]*\n)*)(?P<body>.*?)\n```", re.S)
LABEL_RE = re.compile(r"^:label: *(?P<label>[\w-]+) *$", re.M)
SOLUTION_START_RE = re.compile(r"\A```\{solution-start\} (?P<label>[\w-]+)\n(?::[^\n]*\n)*```\n?")
ROLE_RE = re.compile(r"\{[a-z:-]+\}`([^`]+)`")          # MyST roles: {eq}`eq-ch01-shapes` -> `eq-ch01-shapes`


# --------------------------------------------------------------------------- reading a chapter


@dataclass
class Exercise:
    """One `{exercise}` of a chapter, as the notebook has it."""

    label: str                  # ex-ch01-70b
    text: str                   # the question's markdown, between the label line and the closing fence
    checker: str                # ch01_lora_params (a function of lora_ref.exercises)
    values: dict                # the checker's parameters at the chapter's call, defaults filled in
    answer_comment: str         # the comment on `answer = None  # ...` (the unit asked for)
    solution_text: str          # the markdown of the solution dropdown
    solution_code: list[str]    # its code cells


@dataclass
class Chapter:
    name: str                   # 01_cost_of_finetuning
    title: str                  # The cost of fine-tuning
    colab_line: str             # [Open this chapter in Colab](...)
    install_source: str         # cell 0: installs lora_ref where it is missing
    exercises: list[Exercise] = field(default_factory=list)


def render_myst(text):
    """Question text for a Jupyter notebook: MyST roles (cross-references, citations) become code
    spans naming their target; everything else (math, emphasis) is left as it is."""
    return ROLE_RE.sub(r"`\1`", text).strip()


def question_name(label):
    """ex-ch01-70b -> ch01_70b: the name students pass to grader.check."""
    return label.removeprefix("ex-").replace("-", "_")


def _checker_call(source, where):
    """(checker name, args, kwargs) of the one call `ex.chNN_...(answer, ...)` in a question cell."""
    calls = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "ex"]
    if len(calls) != 1 or not calls[0].args or not (isinstance(calls[0].args[0], ast.Name)
                                                    and calls[0].args[0].id == "answer"):
        raise ValueError(f"{where}: the code cell after an exercise must make one call "
                         f"ex.<checker>(answer, ...); got:\n{source}")
    call = calls[0]
    args = [ast.literal_eval(a) for a in call.args[1:]]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return call.func.attr, args, kwargs


def checker_values(checker, args, kwargs):
    """The checker's parameters (all but `answer`) at a call, with its defaults filled in."""
    from lora_ref import exercises

    bound = inspect.signature(getattr(exercises, checker)).bind(None, *args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop(next(iter(values)))                      # the answer
    return values


def read_chapter(path):
    """The chapter's title, install cell and exercises, as the notebook has them."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    title_lines = cells[1].source.splitlines()
    chapter = Chapter(name=path.stem, title=title_lines[0].removeprefix("# ").strip(),
                      colab_line=next((line for line in title_lines if line.startswith("[Open this chapter in Colab]")), ""),
                      install_source=cells[0].source)
    for i, cell in enumerate(cells):
        if cell.cell_type != "markdown":
            continue
        for m in EXERCISE_RE.finditer(cell.source):
            label_match = LABEL_RE.search(m["options"])
            if label_match is None:
                raise ValueError(f"{path.name}: an exercise without :label:\n{m[0]}")
            label, where = label_match["label"], f"{path.name} ({label_match['label']})"
            code = next((c for c in cells[i + 1:] if c.cell_type == "code"), None)
            if code is None:
                raise ValueError(f"{where}: no code cell after the exercise")
            checker, args, kwargs = _checker_call(code.source, where)
            comment = re.search(r"^answer = None\s*#\s*(.*)$", code.source, re.M)
            start = next((j for j, c in enumerate(cells) if c.cell_type == "markdown"
                          and (s := SOLUTION_START_RE.match(c.source)) and s["label"] == label), None)
            if start is None:
                raise ValueError(f"{where}: no {{solution-start}} {label}")
            sol_code = []
            for c in cells[start + 1:]:
                if c.cell_type == "markdown":
                    break                                 # {solution-end}
                sol_code.append(c.source)
            chapter.exercises.append(Exercise(
                label=label, text=m["body"].strip(), checker=checker,
                values=checker_values(checker, args, kwargs),
                answer_comment=comment[1].strip() if comment else "",
                solution_text=SOLUTION_START_RE.sub("", cells[start].source).strip(),
                solution_code=sol_code))
    return chapter


# --------------------------------------------------------------------------- the spec


def read_spec(chapter_name, spec_dir=SPEC_DIR):
    path = Path(spec_dir) / f"{chapter_name}.yml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: every chapter with exercises needs a spec "
                                f"(see assignments/README.md)")
    spec = yaml.safe_load(path.read_text())
    spec.setdefault("imports", "")
    spec.setdefault("questions", {})
    spec.setdefault("free_response", [])
    spec.setdefault("plots", [])
    return spec


def check_spec(chapter, spec):
    """The spec and the chapter agree: one entry per exercise, arguments the checker has, at least one
    hidden value set per question and one free-response question. Raises, naming what disagrees."""
    problems = []
    labels = [e.label for e in chapter.exercises]
    for label in labels:
        if label not in spec["questions"]:
            problems.append(f"exercise {label} has no entry under questions:")
    for label in spec["questions"]:
        if label not in labels:
            problems.append(f"questions: {label} is not an exercise of notebooks/{chapter.name}.ipynb")
    for e in chapter.exercises:
        q = spec["questions"].get(e.label)
        if q is None:
            continue
        for key in ("function", "args", "solution", "hidden"):
            if key not in q:
                problems.append(f"{e.label}: missing {key}:")
        extra = set(q.get("args", [])) - set(e.values)
        if extra:
            problems.append(f"{e.label}: args {sorted(extra)} are not parameters of {e.checker}{tuple(e.values)}")
        if not q.get("hidden"):
            problems.append(f"{e.label}: needs at least one hidden value set")
        for values in q.get("hidden", []):
            if not set(values) <= set(q.get("args", [])):
                problems.append(f"{e.label}: hidden {values} sets parameters outside args {q.get('args')}")
    problems += _plot_problems(spec, labels)
    if not spec["free_response"]:
        problems.append("no free_response: question (each assignment has at least one)")
    for fr in spec["free_response"]:
        for key in ("name", "after", "prompt"):
            if key not in fr:
                problems.append(f"free_response {fr}: missing {key}:")
        for key in ("after", "answer_from"):
            if key in fr and fr[key] not in labels:
                problems.append(f"free_response {fr.get('name')}: {key}: {fr[key]} is not an exercise label")
    if problems:
        raise ValueError(f"assignments/{chapter.name}.yml disagrees with notebooks/{chapter.name}.ipynb:\n  "
                         + "\n  ".join(problems))


def _plot_problems(spec, labels):
    """What is wrong with the spec's plot questions (the student draws with matplotlib)."""
    from lora_ref import plot_checks

    problems = []
    for plot in spec["plots"]:
        name = plot.get("name", "?")
        for key in ("name", "after", "function", "args", "checker", "prompt", "solution", "values", "hidden"):
            if key not in plot:
                problems.append(f"plots: {name}: missing {key}:")
        if plot.get("after") not in labels:
            problems.append(f"plots: {name}: after: {plot.get('after')} is not an exercise label")
        checker = getattr(plot_checks, plot.get("checker", ""), None)
        if checker is None:
            problems.append(f"plots: {name}: checker {plot.get('checker')} is not in lora_ref.plot_checks")
            continue
        params = list(inspect.signature(checker).parameters)[1:]
        if plot.get("args", [None])[0] != "ax" or plot.get("args", [])[1:] != params:
            problems.append(f"plots: {name}: args must be ['ax'] + {params}, the checker's, not {plot.get('args')}")
        for values in [plot.get("values", {}), *plot.get("hidden", [])]:
            if set(values) != set(params):
                problems.append(f"plots: {name}: values {sorted(values)} are not the checker's {params}")
        if not plot.get("hidden"):
            problems.append(f"plots: {name}: needs at least one hidden value set")
    return problems


# --------------------------------------------------------------------------- the master notebook


def _raw(text):
    return nbformat.v4.new_raw_cell(text)


def _call(function, args, values):
    return f"{function}({', '.join(f'{a}={values[a]!r}' for a in args)})"


def _checker_call_source(checker, function, args, values):
    return f"ex.{checker}({_call(function, args, values)}, {_keywords(values)})"


def _hidden_config(hidden):
    """otter's test config that hides a test from students, or nothing for a public test."""
    return '""" # BEGIN TEST CONFIG\nhidden: true\n""" # END TEST CONFIG\n' if hidden else ""


def _keywords(values):
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _first_paragraph(function):
    """A checker's docstring's first paragraph on one line: the docstring of the student's function."""
    return " ".join(inspect.getdoc(function).split("\n\n")[0].split())


def _test_source(name, e, q, values, hidden):
    """An otter exception-based test: the book's checker at `values`, on the student's function."""
    call, rest = _call(q["function"], q["args"], values), _keywords(values)
    return (f"{_hidden_config(hidden)}def {name}({q['function']}):\n"
            f"    from lora_ref import exercises\n"
            f"    answer = {call}\n"
            f"    assert answer is not None, '{q['function']} returned None: complete its body'\n"
            f"    verdict = exercises.{e.checker}(answer, {rest})\n"
            f"    assert verdict, verdict.message\n")


def _forbid_test_source(q):
    """A hidden test that the answer does not call the library function that computes it."""
    names = list(q["forbid"])
    return (_hidden_config(True) +
            f"def test_computes_the_answer_itself({q['function']}):\n"
            f"    import inspect\n"
            f"    source = inspect.getsource({q['function']})\n"
            f"    used = [name for name in {names!r} if name in source]\n"
            f"    assert not used, f'{q['function']} calls {{used}}, which computes the answer'\n")


def _function_cell(e, q):
    from lora_ref import exercises

    doc = _first_paragraph(getattr(exercises, e.checker))
    body = textwrap.indent(q["solution"].rstrip("\n"), "    ")
    return (f"def {q['function']}({', '.join(q['args'])}):\n"
            f'    """{doc}"""\n'
            f"    # BEGIN SOLUTION\n{body}\n    # END SOLUTION\n\n\n"
            f"# The chapter's question, checked by the book's checker:\n"
            f"{_checker_call_source(e.checker, q['function'], q['args'], e.values)}")


def _instructions(e, q):
    values = ", ".join(f"`{a}={e.values[a]!r}`" for a in q["args"])
    text = (f"**Answer with a function.** Complete `{q['function']}({', '.join(q['args'])})` below so that it "
            f"returns the answer ({e.answer_comment or 'the value asked for'}) for any values of its arguments, "
            f"at the precision the question states. The cell checks it at the question's values, {values}; "
            f"the autograder also tries other values, which you do not see.")
    if q.get("note"):
        text += " " + q["note"].strip()
    return text


def _plot_test_source(name, plot, values, hidden):
    """An otter test that draws the student's figure on a fresh Axes and reads it back with the
    book's plot checker. A bare Figure, no pyplot: the notebook's backend stays as it is."""
    rest = _keywords(values)
    return (f"{_hidden_config(hidden)}def {name}({plot['function']}):\n"
            f"    from matplotlib.figure import Figure\n"
            f"    from lora_ref import plot_checks\n"
            f"    ax = Figure().subplots()\n"
            f"    {plot['function']}(ax, {rest})\n"
            f"    verdict = plot_checks.{plot['checker']}(ax, {rest})\n"
            f"    assert verdict, verdict.message\n")


def _plot_cells(plot):
    """The cells of a plot question: the prompt, the function with its solution, the figure drawn at
    the question's values and checked, then the public and hidden tests."""
    from lora_ref import plot_checks

    doc = _first_paragraph(getattr(plot_checks, plot["checker"]))
    body = textwrap.indent(plot["solution"].rstrip("\n"), "    ")
    rest = _keywords(plot["values"])
    code = (f"def {plot['function']}({', '.join(plot['args'])}):\n"
            f'    """Draw on the matplotlib Axes ax {doc[0].lower() + doc[1:]}"""\n'
            f"    # BEGIN SOLUTION\n{body}\n    # END SOLUTION\n\n\n"
            f"# The figure at the question's values, read back by the book's plot checker:\n"
            f"fig, ax = plt.subplots(figsize=(6, 4))\n"
            f"{plot['function']}(ax, {rest})\n"
            f"verdict = pc.{plot['checker']}(ax, {rest})\n"
            f"plt.show()\n"
            f"verdict")
    text = (f"## Plot (`{plot['name']}`)\n\n{plot['prompt'].strip()}\n\n"
            f"**Answer with a figure.** Complete `{plot['function']}({', '.join(plot['args'])})` so that it draws "
            f"the figure on the matplotlib Axes `ax` it is given (do not create a figure of your own). The cell "
            f"draws it at the question's values and checks it; the autograder draws it again at other values "
            f"and reads back what you plotted through the Axes (`ax.get_lines()`, each line's data and label, "
            f"the axis titles and scales), never the pixels.")
    config = {"name": plot["name"], "points": plot.get("points", 2), "all_or_nothing": True}
    tests = [_plot_test_source("test_plot_values", plot, plot["values"], hidden=False)]
    tests += [_plot_test_source(f"test_other_values_{j}", plot, values, hidden=True)
              for j, values in enumerate(plot["hidden"], 1)]
    return [_raw("# BEGIN QUESTION\n" + yaml.safe_dump(config, sort_keys=False).strip()),
            nbformat.v4.new_markdown_cell(text),
            _raw("# BEGIN SOLUTION"),
            nbformat.v4.new_code_cell(code),
            _raw("# END SOLUTION"),
            _raw("# BEGIN TESTS"),
            *[nbformat.v4.new_code_cell(t) for t in tests],
            _raw("# END TESTS"),
            _raw("# END QUESTION")]


def _free_response_cells(fr, chapter):
    by_label = {e.label: e for e in chapter.exercises}
    answer = []
    if fr.get("answer_from"):
        answer.append("**Model answer** (the book's solution): " + render_myst(by_label[fr["answer_from"]].solution_text))
    if fr.get("rubric"):
        answer.append("**Rubric.** " + fr["rubric"].strip())
    config = {"name": fr["name"], "manual": True, "points": fr.get("points", 2)}
    return [_raw("# BEGIN QUESTION\n" + yaml.safe_dump(config, sort_keys=False).strip()),
            nbformat.v4.new_markdown_cell(f"**Free response** (graded by hand). {fr['prompt'].strip()}"),
            _raw("# BEGIN SOLUTION"),
            nbformat.v4.new_markdown_cell("\n\n".join(answer) or "_(no model answer in the spec)_"),
            _raw("# END SOLUTION"),
            _raw("# END QUESTION")]


INIT_CELL = '''\
# otter-grader. Colab opens this notebook without its folder: the public tests (the folder tests/
# next to the notebook) are then unpacked from the zip below; they are the same files.
import base64
import io
import os
import zipfile

import otter

PUBLIC_TESTS = ""  # filled in by tools/build_assignments.py
if not os.path.isdir("tests") and PUBLIC_TESTS:
    zipfile.ZipFile(io.BytesIO(base64.b64decode(PUBLIC_TESTS))).extractall(".")
grader = otter.Notebook("{notebook}" if os.path.isfile("{notebook}") else None)'''


def install_cell_source(chapter):
    """The chapter's own install cell, plus otter-grader at the autograder's version."""
    return (chapter.install_source.rstrip("\n") + "\n\n"
            "# The autograder's client: grader.check(...) below.\n"
            'if importlib.util.find_spec("otter") is None:\n'
            f'    _pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "otter-grader=={OTTER_VERSION}"],\n'
            "                          capture_output=True, text=True)\n"
            "    importlib.invalidate_caches()\n"
            '    if _pip.returncode != 0 or importlib.util.find_spec("otter") is None:\n'
            f'        print("Installing otter-grader failed; install it by hand with  pip install otter-grader=={OTTER_VERSION}  "\n'
            '              "then restart the kernel.")\n')


def torch_requirement():
    """torch as requirements.txt pins it (a CPU build in the grading image, from PyTorch's CPU index)."""
    pin = re.search(r"^torch==\S+", (ROOT / "requirements.txt").read_text(), re.M)
    if pin is None:
        raise RuntimeError("requirements.txt does not pin torch")
    return pin[0]


def pinned(package):
    """``package==version`` as requirements.txt pins it."""
    pin = re.search(rf"^{re.escape(package)}==\S+", (ROOT / "requirements.txt").read_text(), re.M)
    if pin is None:
        raise RuntimeError(f"requirements.txt does not pin {package}")
    return pin[0]


def assignment_config(chapter, lora_ref_requirement, plots=False):
    """otter's `# ASSIGNMENT CONFIG`. Tests are files (Colab needs them so); the grading image gets
    CPU torch and lora_ref, pinned as the book pins them."""
    config = {
        "name": f"{chapter.name}_assignment",
        "init_cell": False,               # ours comes after the install cell
        "check_all_cell": True,
        "export_cell": False,             # students hand in the .ipynb itself
        "python_version": "3.11",
        "requirements": ["--extra-index-url https://download.pytorch.org/whl/cpu",
                         torch_requirement(), lora_ref_requirement] + ([pinned("matplotlib")] if plots else []),
        "tests": {"files": True, "ok_format": False},
        "generate": {"pdf": False, "filtering": False, "show_stdout": True},
    }
    return "# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False)


def master_notebook(chapter, spec, lora_ref_requirement):
    """The otter master notebook (format v1) of a chapter's assignment."""
    check_spec(chapter, spec)
    notebook = f"{chapter.name}_assignment.ipynb"
    intro = (f"# Assignment: {chapter.title}\n\n"
             f"The questions are the exercises of the chapter *{chapter.title}* of *The Mathematics of LoRA* "
             f"({chapter.colab_line.strip() or 'notebooks/' + chapter.name + '.ipynb'}). "
             "Names in code font such as `eq-ch01-shapes` are the chapter's labels of equations and "
             "propositions.\n\n"
             "Run the cells in order. Each auto-graded question asks for a function; complete its body, run "
             "the cell (the book's checker prints ✓ or a hint) and then `grader.check(...)`, which runs the "
             "question's public test. The autograder runs hidden tests as well: the same question at other "
             "values. A question scores its points only if every test passes. Free-response questions are "
             "graded by hand. Hand in this notebook (`.ipynb`).")
    cells = [_raw(assignment_config(chapter, lora_ref_requirement, plots=bool(spec["plots"]))),
             nbformat.v4.new_code_cell(install_cell_source(chapter)),
             nbformat.v4.new_markdown_cell(intro),
             nbformat.v4.new_code_cell(INIT_CELL.format(notebook=notebook)),
             nbformat.v4.new_code_cell("from lora_ref import exercises as ex\n"
                                       + ("import matplotlib.pyplot as plt\n\nfrom lora_ref import plot_checks as pc\n"
                                          if spec["plots"] else "") + spec["imports"].strip())]
    for n, e in enumerate(chapter.exercises, 1):
        q = spec["questions"][e.label]
        config = {"name": question_name(e.label), "points": q.get("points", 1), "all_or_nothing": True}
        tests = [_test_source("test_question_values", e, q, e.values, hidden=False)]
        for j, values in enumerate(q["hidden"], 1):
            tests.append(_test_source(f"test_other_values_{j}", e, q, {**e.values, **values}, hidden=True))
        if q.get("forbid"):
            tests.append(_forbid_test_source(q))
        cells += [_raw("# BEGIN QUESTION\n" + yaml.safe_dump(config, sort_keys=False).strip()),
                  nbformat.v4.new_markdown_cell(f"## Question {n} (`{e.label}`)\n\n{render_myst(e.text)}\n\n"
                                                + _instructions(e, q)),
                  _raw("# BEGIN SOLUTION"),
                  nbformat.v4.new_code_cell(_function_cell(e, q)),
                  nbformat.v4.new_markdown_cell("**The book's solution.** " + render_myst(e.solution_text)),
                  _raw("# END SOLUTION"),
                  _raw("# BEGIN TESTS"),
                  *[nbformat.v4.new_code_cell(t) for t in tests],
                  _raw("# END TESTS"),
                  _raw("# END QUESTION")]
        for plot in spec["plots"]:
            if plot["after"] == e.label:
                cells += _plot_cells(plot)
        for fr in spec["free_response"]:
            if fr["after"] == e.label:
                cells += _free_response_cells(fr, chapter)
    cells.append(nbformat.v4.new_markdown_cell("## Hand in\n\nRun every cell from the top, check that the "
                                               "cell below passes, save, and hand in this `.ipynb` file."))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# --------------------------------------------------------------------------- otter assign


def _pack_public_tests(tests_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(Path(tests_dir).glob("*.py")):
            zf.write(path, arcname=f"tests/{path.name}")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fill_public_tests(nb_path, packed):
    nb = nbformat.read(nb_path, as_version=4)
    marker = 'PUBLIC_TESTS = ""  # filled in by tools/build_assignments.py'
    hits = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    if len(hits) != 1:
        raise RuntimeError(f"{nb_path}: expected one init cell with {marker!r}")
    hits[0].source = hits[0].source.replace(marker, f'PUBLIC_TESTS = "{packed}"')
    nbformat.write(nb, nb_path)


def default_lora_ref_requirement():
    """lora_ref from the book's one repository (its URL is kept in _config.yml)."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    return f"lora_ref @ git+{url}"


def build(chapter_name, out=DEFAULT_OUT, *, run_tests=True, spec_dir=SPEC_DIR, notebook_dir=NOTEBOOK_DIR,
          lora_ref_requirement=None):
    """Write the master, run `otter assign`, and return the chapter's output directory."""
    import otter.assign

    out = Path(out).resolve()
    chapter = read_chapter(Path(notebook_dir) / f"{chapter_name}.ipynb")
    spec = read_spec(chapter_name, spec_dir)
    nb = master_notebook(chapter, spec, lora_ref_requirement or default_lora_ref_requirement())
    masters = out / "masters"
    masters.mkdir(parents=True, exist_ok=True)
    master = masters / f"{chapter_name}_assignment.ipynb"
    nbformat.write(nb, master)
    result = out / chapter_name
    shutil.rmtree(result, ignore_errors=True)
    otter.assign.main(str(master), str(result), no_run_tests=not run_tests, no_pdfs=True)
    # A stable name for the autograder zip (otter stamps it with the time).
    zips = sorted((result / "autograder").glob(f"{master.stem}-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"expected one autograder zip in {result / 'autograder'}, found {zips}")
    zips[0].rename(result / "autograder" / f"{chapter_name}-autograder.zip")
    packed = _pack_public_tests(result / "student" / "tests")
    for side in ("student", "autograder"):
        _fill_public_tests(result / side / master.name, packed)
    return result


DOWNLOADS = "lora-book-assignments"             # the archive of every chapter's assignment


def pack_downloads(out, chapters, site=None):
    """One zip of every built chapter's student notebook, public tests and autograder zip:
    ``<out>/lora-book-assignments.zip``, with a copy of it and of each chapter's student notebook and
    autograder zip under ``<site>/assignments/`` when ``site`` (the built book) is given, for the
    instructors page. The masters and the solution notebooks stay out. Returns the archive's path."""
    out = Path(out)
    archive = out / f"{DOWNLOADS}.zip"
    tmp = archive.with_name(archive.name + ".tmp")
    files = []
    for name in chapters:
        files += [out / name / "student" / f"{name}_assignment.ipynb",
                  *sorted((out / name / "student" / "tests").glob("*.py")),
                  out / name / "autograder" / f"{name}-autograder.zip"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"not built: {missing[:3]}: run make assignments")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, arcname=f"{DOWNLOADS}/{f.relative_to(out).as_posix()}")
    tmp.replace(archive)
    if site is not None and Path(site, "index.html").exists():
        dest = Path(site) / "assignments"
        dest.mkdir(exist_ok=True)
        shutil.copyfile(archive, dest / archive.name)
        for name in chapters:
            shutil.copyfile(out / name / "student" / f"{name}_assignment.ipynb", dest / f"{name}_assignment.ipynb")
            shutil.copyfile(out / name / "autograder" / f"{name}-autograder.zip", dest / f"{name}-autograder.zip")
    return archive


def chapters_with_exercises(notebook_dir=NOTEBOOK_DIR):
    return [p.stem for p in sorted(Path(notebook_dir).glob("*.ipynb"))
            if any(EXERCISE_RE.search(c.source) for c in nbformat.read(p, as_version=4).cells
                   if c.cell_type == "markdown")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter names (default: every chapter with exercises)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: _build/assignments)")
    parser.add_argument("--no-run-tests", action="store_true",
                        help="skip otter's own run of the tests on the solution notebook")
    parser.add_argument("--specs", default=str(SPEC_DIR),
                        help="directory of the specs (default: assignments/); a private copy keeps your hidden "
                             "values and solutions out of the public repository")
    parser.add_argument("--lora-ref", default=None,
                        help="the grading image's requirement for lora_ref (default: the book's repository, "
                             "main branch); pin a commit with 'lora_ref @ git+<url>@<sha>'")
    args = parser.parse_args(argv)
    chapters = args.chapters or chapters_with_exercises()
    missing = [c for c in chapters if not (Path(args.specs) / f"{c}.yml").exists()]
    for name in chapters:
        if name in missing:
            continue
        result = build(name, args.out, run_tests=not args.no_run_tests, spec_dir=args.specs,
                       lora_ref_requirement=args.lora_ref)
        print(f"{name}: {result.relative_to(Path.cwd()) if result.is_relative_to(Path.cwd()) else result}")
    built = [c for c in chapters if c not in missing]
    if built:
        archive = pack_downloads(args.out, built, site=ROOT / "_build" / "html")
        print(f"{archive}: every assignment in one archive (a copy in _build/html/assignments/ if the book is built)")
    if missing:
        sys.exit(f"no spec in {args.specs} for: {', '.join(missing)}: write assignments/<chapter>.yml "
                 f"(assignments/README.md)")


if __name__ == "__main__":
    main()
