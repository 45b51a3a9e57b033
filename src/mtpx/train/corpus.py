"""Offline corpus for the demo model: Python stdlib source (code), docs/docstrings (prose), synthetic chats.

Everything comes from what a fresh machine gets from its package registries: the interpreter's own standard
library, and Debian's `python3-doc` HTML when installed. A fixed, documented set of stdlib files is held out for
evaluation (never trained on).
"""
from __future__ import annotations

import ast
import hashlib
import html
import json
import random
import re
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DOC_SEPARATOR = "<|endoftext|>"
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not SKIP_PARTS & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: str(f.relative_to(root)))


def is_held_out(path: Path) -> bool:
    """A fixed 1-in-16 split by file name (stable across machines and Python patch releases)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] % 16 == 0


def docstring_pairs(source: str) -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) for public functions and classes."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append((node.name, doc.split("\n\n")[0].strip()))
    return out


def html_text(path: Path) -> str:
    raw = path.read_text(encoding="utf-8", errors="ignore")
    raw = re.sub(r"(?s)<(script|style).*?</\1>", " ", raw)
    # the page body only: Sphinx follows it with the sidebar, navigation and footer ("Please donate.", dates, ...)
    start = re.search(r"<div class=\"body\"[^>]*>", raw)
    if start:
        raw = raw[start.end():]
    end = re.search(r"<div class=\"(sphinxsidebar|related|footer)\"", raw)
    if end:
        raw = raw[:end.start()]
    raw = re.sub(r"(?s)<a class=\"headerlink\".*?</a>", "", raw)  # the pilcrow after every heading
    text = html.unescape(re.sub(r"<[^>]+>", "", raw))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def chat(question: str, answer: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


QUESTIONS = ["What does `{name}` do?", "Explain `{name}` briefly.", "What is {name} for?",
             "Can you describe the `{name}` {kind} in the {module} module?", "How does {module}.{name} work?"]


def build_corpus(out: Path, seed: int = 0, prose_dirs: list[Path] | None = None) -> dict:
    """Write train.txt, val.txt (held-out code) and recipe.json into `out`; return the recipe."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    code, chats, prose, held = [], [], [], []
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in stdlib_files():
        src = f.read_text(encoding="utf-8", errors="ignore")
        rel = str(f.relative_to(root))
        if is_held_out(f):
            held.append(rel)
            continue
        code.append(src)
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for name, doc in docstring_pairs(src):
            q = rng.choice(QUESTIONS).format(name=name, module=module, kind="function or class")
            chats.append(chat(q, doc))
            prose.append(f"{module}.{name}\n\n{doc}\n")
    doc_roots = prose_dirs if prose_dirs is not None else [Path("/usr/share/doc/python3-doc/html/library"),
                                                           Path("/usr/share/doc/python3-doc/html/tutorial")]
    n_html = 0
    for d in doc_roots:
        for f in sorted(d.glob("*.html")) if d.exists() else []:
            text = html_text(f)
            if len(text) > 200:
                prose.append(text)
                n_html += 1
    docs = [("code", c) for c in code] + [("prose", p) for p in prose] + [("chat", c) for c in chats]
    rng.shuffle(docs)
    with open(out / "train.txt", "w", encoding="utf-8") as fh:
        for _, d in docs:
            fh.write(d.strip("\n") + "\n" + DOC_SEPARATOR)
    with open(out / "val.txt", "w", encoding="utf-8") as fh:
        for rel in held:
            fh.write((root / rel).read_text(encoding="utf-8", errors="ignore").strip("\n") + "\n" + DOC_SEPARATOR)
    recipe = {
        "stdlib": str(root), "code_files": len(code), "held_out_files": held, "docstring_prose": len(prose) - n_html,
        "python3_doc_pages": n_html, "chats": len(chats),
        "train_chars": sum(len(d) for _, d in docs), "seed": seed,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return recipe
