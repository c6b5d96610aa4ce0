"""The layers a reader can draw, checked from the source: what the top level shows, which module imports which,
and which modules one optimizer step of each stage reaches."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"prepare_data", "train_pt", "train_sft", "train_dpo", "train_grpo", "sample", "eval", "bench", "report"}
TRAINING_SCRIPTS = ["train_pt", "train_sft", "train_dpo", "train_grpo"]
PACKAGE = sorted("nanodoge." + name[:-3] for name in os.listdir(os.path.join(ROOT, "nanodoge"))
                 if name.endswith(".py") and name != "__init__.py")
MODULES = sorted(SCRIPTS) + ["model"] + PACKAGE


def source_path(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def project_names(tree):
    """{name bound by a top-level import of a module: the project module it stands for}: `from nanodoge import
    training` binds training, `from nanodoge.engine import Engine` binds Engine, `from model import Doge` Doge."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "nanodoge":
            names.update({(a.asname or a.name): f"nanodoge.{a.name}" for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            names.update({(a.asname or a.name): node.module for a in node.names})
        elif isinstance(node, ast.Import):
            names.update({(a.asname or a.name): a.name for a in node.names if a.name in MODULES})
    return names


def imports(module, top_only=False):
    """The project modules `module` imports: anywhere in its source (lazy imports included), or at its top."""
    tree = ast.parse(open(source_path(module)).read())
    found = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "nanodoge":
            found |= {f"nanodoge.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_top_level_shows_the_mission():
    """What a user runs and reads first, and beside it the toolbox in one package."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: what is on disk
        tracked = os.listdir(ROOT)
    top = {path.split("/")[0] for path in tracked}
    assert {name[:-3] for name in top if name.endswith(".py")} == SCRIPTS | {"model"}
    assert top - {name for name in top if name.endswith(".py")} == {
        "nanodoge", "config", "tests", "README.md", "LOG.md", "requirements.txt", "run_chain.sh", "pytest.ini",
        ".ci", ".gitignore"}


def test_model_imports_only_torch_the_standard_library_and_safetensors():
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "huggingface_hub"}
    found = {name.split(".")[0] for name in imports("model")}
    assert found <= allowed, found - allowed


def test_imports_go_one_way():
    """model <- the package <- the scripts; no script imports another, the package never a script, no cycles."""
    project = {m: imports(m) & set(MODULES) for m in MODULES}
    assert project["model"] == set()
    for script in SCRIPTS:
        assert not project[script] & SCRIPTS, (script, project[script] & SCRIPTS)
    for module in PACKAGE:
        assert not project[module] & SCRIPTS, (module, project[module] & SCRIPTS)
    done = set()  # peel off the modules whose imports are all peeled already
    while len(done) < len(project):
        ready = {m for m, deps in project.items() if m not in done and deps <= done}
        assert ready, f"an import cycle among {sorted(set(project) - done)}"
        done |= ready


def step_statements(source, tree):
    """The statements of one optimizer step in main()'s training loop: from the loop's start through the last
    statement that zeroes the gradients or lets DeepSpeed step (what follows is the log, eval and save)."""
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    loop = next(node for node in ast.walk(main) if isinstance(node, ast.For)
                and ast.get_source_segment(source, node.iter).startswith("range(start_step"))
    ends = [i for i, node in enumerate(loop.body) if "zero_grad(" in ast.get_source_segment(source, node)]
    assert ends, "the step zeroes its gradients on the page"
    return loop.body[:ends[-1] + 1]


def modules_reached(source, tree, statements):
    """The project modules the step's calls reach: names of project modules (or names imported from them) used in
    the statements, and in the script's own functions they call, followed through the script."""
    names = project_names(tree)
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    reached, seen, todo = set(), set(), list(statements)
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, ast.Name) and node.id in names:
                reached.add(names[node.id])
            elif isinstance(node, ast.Name) and node.id in functions and node.id not in seen and node.id != "main":
                seen.add(node.id)
                todo.append(functions[node.id])
    return reached


def test_each_training_script_writes_its_step_on_the_page():
    """Every part of an optimizer step is written in the stage's loop, in the order it runs: the learning rate set
    on the optimizer, autocast, the forward and its loss, the backward through the scaler, the unscale, clip,
    optimizer step, scaler update and zero_grad (and DeepSpeed's own calls where it takes over); the step reaches
    at most three project modules besides the model (GRPO four: its rollouts' engine, and the curriculum's
    line checker for the process reward)."""
    for script in TRAINING_SCRIPTS:
        source = open(source_path(script)).read()
        tree = ast.parse(source)
        step = "\n".join(ast.get_source_segment(source, node) for node in step_statements(source, tree))
        backward = "policy_backward(" if script == "train_grpo" else ".backward()"  # GRPO's, in its own file
        order = ['group["lr"] = ', "with autocast", backward, "unscale_(", "clip_grad_norm_(", ".step(optimizer)",
                 ".update()", "zero_grad("]
        positions = [step.find(part) for part in order]
        assert -1 not in positions, (script, [p for p, i in zip(order, positions) if i == -1])
        assert positions == sorted(positions), (script, order)
        if script != "train_grpo":  # ZeRO trains the three stages that take --backend=deepspeed
            assert "engine.backward(" in step and "engine.step()" in step, script
        reached = modules_reached(source, tree, step_statements(source, tree)) - {"model"}
        assert len(reached) <= (4 if script == "train_grpo" else 3), (script, sorted(reached))


def test_deepspeed_is_imported_only_with_backend_deepspeed():
    """nanodoge/deepspeed_zero.py (and deepspeed itself) is imported lazily: a ddp run never loads it."""
    for module in MODULES:
        assert "nanodoge.deepspeed_zero" not in imports(module, top_only=True), module
        assert "deepspeed" not in imports(module, top_only=True), module
