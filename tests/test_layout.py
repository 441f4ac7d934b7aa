"""The house by role: a layer imports only from the layers below it (every import in every module,
function-level ones included), and the public facades that keep stable names over moved code
(``models.qwen2_5_vl.from_pretrained``, ``models.wan.generate``) never import the layers above when
the package is imported."""
import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# package (or module) -> layer; a module may import its own package and lower layers only
LAYERS = {
    "vans_jax._lazy": 0, "vans_jax._files": 0, "vans_jax.parallel": 0,
    "vans_jax.models": 1,
    "vans_jax.convert": 2,
    "vans_jax.data": 3,
    "vans_jax.sampling": 4,
    "vans_jax.rl": 5,
    "vans_jax.train": 6, "vans_jax.eval": 6,
    "vans_jax.pipeline": 7,
    "vans_jax.apps": 8,
}
# the lazy re-exports allowed to point upward (public names kept where code moved)
FACADES = {
    "vans_jax.models.qwen2_5_vl": {"vans_jax.convert.qwen2_5_vl", "vans_jax.sampling.text"},
    "vans_jax.models.wan": {"vans_jax.sampling.wan"},
}


def room(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} sits on no layer: add it to a package of the layout")


def package_modules():
    out = {}
    for dp, _, files in os.walk(os.path.join(ROOT, "vans_jax")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mod = mod[:-len(".__init__")] if mod.endswith(".__init__") else mod
                if mod != "vans_jax":            # the empty top package
                    out[mod] = path
    return out


def imports_of(module: str, path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)   # `from pkg import submodule`
    return {m for m in found if m.split(".")[0] == "vans_jax" and m != "vans_jax"}


def resolve(name: str, modules: dict) -> str | None:
    """The package module an imported name refers to (``from a.b import c``: a.b.c if a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_points_down():
    modules = package_modules()
    bad = []
    for mod, path in sorted(modules.items()):
        mine = room(mod)
        for imp in imports_of(mod, path):
            target = resolve(imp, modules)
            if target is None or target == "vans_jax":
                continue
            theirs = room(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{mod} ({mine}, layer {LAYERS[mine]}) imports {target} ({theirs}, layer {LAYERS[theirs]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_the_table_covers_the_package():
    for mod in package_modules():
        room(mod)                # raises for a module on no layer


def test_models_import_nothing_above():
    """``models`` imports nothing from convert, sampling, data, rl, train, eval, apps (checked on the
    imports themselves and on what importing every models module actually loads)."""
    modules = package_modules()
    models = [m for m in modules if room(m) == "vans_jax.models"]
    code = ("import importlib, json, sys\n"
            f"for m in {models!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vans_jax.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    above = [m for m in loaded if m in modules and LAYERS[room(m)] > LAYERS["vans_jax.models"]]
    assert not above, f"importing vans_jax.models loads {above}"


def test_facades_are_declared_and_resolve():
    from vans_jax.models import qwen2_5_vl, wan
    for pkg in (qwen2_5_vl, wan):
        assert set(pkg.FACADE) == FACADES[pkg.__name__], f"{pkg.__name__}: undeclared facade"
        for target, names in pkg.FACADE.items():
            mod = __import__(target, fromlist=["_"])
            for name in names:
                assert getattr(pkg, name) is getattr(mod, name)


def test_no_cycles_between_packages():
    modules = package_modules()
    edges = {}
    for mod, path in modules.items():
        for imp in imports_of(mod, path):
            target = resolve(imp, modules)
            if target and target != "vans_jax" and room(target) != room(mod):
                edges.setdefault(room(mod), set()).add(room(target))
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
        if n in seen:
            return
        stack.append(n)
        for m in edges.get(n, ()):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in list(edges):
        visit(n)
