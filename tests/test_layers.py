"""The package's import graph, read from the source with `ast`: every import runs from a
layer to one it may use (docs/architecture.md, "Rules the layout keeps"), no modules
import each other in a loop, and a client process loads neither tpm2-pytss nor anything
of the broker's tpm/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "broker" / "tpmbroker"

# Each layer and the layers below it that it may import. A module belongs to the first
# layer one of whose names is the module or a package holding it.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # numbers both sides share, errors, paths: imports nothing of the package's own
    "foundation": (("version", "definitions", "errors", "paths", "audit", "tss2log"), ()),
    # the wire: frames and each operation's messages
    "codec": (("protocol", "ops"), ("foundation",)),
    # the key file format, key policies, key references, TPM object templates, EK trust
    "key formats": (("keyfile", "keypolicy", "keyref", "templates", "ek_trust", "attestation"),
                    ("foundation", "codec")),
    # what a client process runs
    "client": (("client", "verification", "cryptography_keys", "wrap", "loadgen"),
               ("foundation", "codec", "key formats")),
    # the TPM side of the broker
    "tpm": (("tpm",), ("foundation", "codec", "key formats")),
    # the broker around it: procedures, queue, lane, connections, access control
    "broker": (("procedures", "scheduler", "admission", "lane", "listener", "access",
                "metrics", "server"), ("foundation", "codec", "key formats", "tpm")),
    # programs: the command, the simulator, helper processes, the package's lazy names
    "programs": (("cli", "keypolicy_authoring", "simulator", "processes", "__init__"),
                 ("foundation", "codec", "key formats", "client", "tpm", "broker")),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    for layer, (names, _uses) in LAYERS.items():
        if any(module == name or module.startswith(name + ".") for name in names):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _resolve(base: str, level: int, name: str | None) -> str:
    """The package module a `from ... import` names, relative to module `base`."""
    package = base.split(".")
    if MODULES[base].name != "__init__.py":
        package = package[:-1]
    if base == "__init__":
        package = []
    package = package[:len(package) - (level - 1)] if level > 1 else package
    return ".".join([*package, *(name.split(".") if name else [])])


def imports(module: str, *, typing_only: bool = True) -> set[str]:
    """The package's modules `module` imports, at the top or inside functions; without
    `typing_only`, not counting those under `if TYPE_CHECKING:`."""
    tree = ast.parse(MODULES[module].read_text())
    skipped: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _resolve(module, node.level, node.module)
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names])
            for name in names:
                if name.startswith("tpmbroker."):
                    found.add(name.removeprefix("tpmbroker."))
    found.discard("")
    return {name for name in found if name in MODULES and name != module}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_imports_run_down_the_layers_only() -> None:
    wrong = []
    for module in MODULES:
        layer = layer_of(module)
        allowed = {layer, *LAYERS[layer][1]}
        wrong += [f"{module} ({layer}) imports {target} ({layer_of(target)})"
                  for target in sorted(imports(module)) if layer_of(target) not in allowed]
    assert wrong == []


def test_no_modules_import_each_other_in_a_loop() -> None:
    """Imports that run (TYPE_CHECKING ones name types only). Not seen: the
    importlib.import_module calls by which ops, procedures and cli import their own
    modules (down, into the package), and protocol.py's of ops, which registers the
    messages for a process that imported the codec alone (a deliberate late edge,
    within the codec layer)."""
    graph = {module: imports(module, typing_only=False) for module in MODULES}
    loops: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                loops.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert loops == []


def test_the_graph_reader_sees_imports() -> None:
    """The checks above are only as good as the graph: spot-check it."""
    assert {"ops.sign", "protocol", "keyref", "definitions"} <= imports("client")
    assert "tpm.worker" in imports("procedures.sign")
    assert "tpm.worker" in imports("lane")  # under TYPE_CHECKING
    assert "tpm.worker" not in imports("lane", typing_only=False)
    assert "access" in imports("cli.serve")  # inside a function


@pytest.mark.parametrize("module", ["tpmbroker.client", "tpmbroker.cryptography_keys",
                                    "tpmbroker.keyfile", "tpmbroker.keypolicy",
                                    "tpmbroker.loadgen"])
def test_a_client_loads_neither_tpm2_pytss_nor_tpm(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tpm2_pytss' "
            "or m.startswith(('tpmbroker.tpm', 'tpmbroker.procedures'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_wrapping_a_key_loads_nothing_of_tpm() -> None:
    """wrap_key needs tpm2-pytss's duplication, but none of the broker's TPM side."""
    code = """if True:
        import sys
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        import tpmbroker
        parent = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        der = tpmbroker.wrap_key(ec.generate_private_key(ec.SECP256R1()), parent)
        assert der.startswith(b"\\x30")
        print(sorted(m for m in sys.modules if m.startswith(("tpmbroker.tpm",
                                                              "tpmbroker.procedures"))))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
