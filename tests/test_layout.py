"""The layers a reader can draw: which module imports which, checked from the source."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))
STAGE_SCRIPTS = {"prepare_data", "train_pt", "train_sft", "train_dpo", "train_grpo", "sample"}
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
