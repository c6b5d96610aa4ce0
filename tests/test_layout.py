"""The layers a reader can draw: which module imports which, checked from the source."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))
STAGE_SCRIPTS = {"prepare_data", "train_pt", "train_sft", "train_dpo", "train_grpo", "sample"}
TRAINING_SCRIPTS = {"train_pt", "train_sft", "train_dpo", "train_grpo"}
TOOLS = {"bench", "report", "eval"}  # measure or report on the scripts' work (bench reads prepare_data's corpus); nothing imports them

def imports(module):
    """Top-level names of every module `module` imports, anywhere in its source (lazy imports included)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names

def top_level_imports(module):
    """The project modules `module` imports at its top, when it is imported (not inside a function)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)

def test_model_imports_only_torch_the_standard_library_and_safetensors():
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "huggingface_hub"}
    assert imports("model") <= allowed, imports("model") - allowed

def test_imports_go_one_way():
    project = {m: imports(m) & set(MODULES) for m in MODULES}
    assert project["model"] == set() and project["common"] == set()
    for script in STAGE_SCRIPTS:
        assert not project[script] & STAGE_SCRIPTS, (script, project[script] & STAGE_SCRIPTS)
    assert not project["eval"] & (STAGE_SCRIPTS | TOOLS), project["eval"]  # the model's forward and shared loaders only
    for module in set(MODULES) - STAGE_SCRIPTS - TOOLS:
        assert not project[module] & (STAGE_SCRIPTS | TOOLS), (module, project[module] & (STAGE_SCRIPTS | TOOLS))
    # no cycles: repeatedly peel off the modules whose imports are all peeled already
    done = set()
    while len(done) < len(project):
        ready = {m for m, deps in project.items() if m not in done and deps <= done}
        assert ready, f"an import cycle among {sorted(set(project) - done)}"
        done |= ready

def project_names(tree):
    """{name bound at the top of a module: the project module it comes from} (import x as y; from x import a)."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update({(a.asname or a.name): a.name for a in node.names if a.name in MODULES})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            names.update({(a.asname or a.name): node.module for a in node.names})
    return names

def test_each_training_script_writes_its_own_loop_from_a_toolbox():
    """The loop of a stage is in its file: training.py (the toolbox) defines no train() that calls back into a
    stage; every training script's main() runs its steps itself (set the learning rate, the micro-steps or the
    GRPO updates, the backend's clip and optimizer step), and the loop's body calls into at most three other
    project modules (the model's forward is a call on the model object)."""
    training = ast.parse(open(os.path.join(ROOT, "training.py")).read())
    assert "train" not in {node.name for node in training.body if isinstance(node, ast.FunctionDef)}
    for script in TRAINING_SCRIPTS:
        source = open(os.path.join(ROOT, script + ".py")).read()
        tree = ast.parse(source)
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        loop = next(node for node in ast.walk(main) if isinstance(node, ast.For)
                    and ast.get_source_segment(source, node.iter).startswith("range(start_step"))
        loop_source = ast.get_source_segment(source, loop)
        assert "training.set_learning_rate(" in loop_source and "backend.step(" in loop_source, script
        assert "for micro_step in range(" in loop_source or "for iteration in range(" in loop_source, script
        names = project_names(tree)
        reached = {names[node.id] for node in ast.walk(loop) if isinstance(node, ast.Name) and node.id in names}
        assert len(reached) <= 3, (script, reached)
        assert "training" in reached, script

def test_deepspeed_is_imported_only_with_backend_deepspeed():
    """deepspeed_zero.py (and deepspeed itself) is imported lazily, inside training.make_backend: a ddp run never
    loads it."""
    for module in MODULES:
        assert "deepspeed_zero" not in top_level_imports(module), module
        assert "deepspeed" not in top_level_imports(module) or module == "deepspeed_zero", module
    assert "deepspeed" not in {a.name for n in ast.parse(open(os.path.join(ROOT, "deepspeed_zero.py")).read()).body
                               if isinstance(n, ast.Import) for a in n.names}
