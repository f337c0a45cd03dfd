"""Corpus readers: documents as lists of sentences, read lazily.

A *document* is a list of sentence strings. Packing (`fastmlm.data.packing`)
fills examples with consecutive sentences of one document, so the unit
boundaries matter only as the places where a segment A may end and B begin.

Two sources:

- plain text files (`read_text_documents`): either one document per block of
  lines separated by blank lines, each line a sentence (BERT's pre-training
  text format), or one document per line, split into sentences by punctuation;
- the built-in default corpus (`stdlib_docstring_documents`): the docstrings of
  a fixed list of Python standard-library modules, gathered at run time. It
  needs no download and no licence beyond Python's own, and is deterministic
  for a given Python version (a run directory records a fingerprint of the
  packed data so a resume on a different Python notices the difference).
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

Document = list[str]
DocumentPer = Literal["block", "line"]

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter,
# digit or quote; good enough for English prose and docstrings, and it never
# splits "e.g. foo" or "os.path.join".
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_WHITESPACE = re.compile(r"\s+")

# Modules whose docstrings make up the default corpus. Pure, import-safe,
# present in every CPython build >= 3.9 (no GUI, no optional C libraries
# beyond sqlite3, which every official build ships). Order is part of the
# corpus: changing it changes the default data.
STDLIB_CORPUS_MODULES: tuple[str, ...] = (
    "builtins", "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message",
    "enum", "fractions", "functools", "gettext", "glob", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "logging.handlers", "mailbox", "math",
    "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pprint", "queue", "random", "re", "sched", "selectors", "shlex",
    "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; whitespace (including newlines) is collapsed."""
    text = _WHITESPACE.sub(" ", text).strip()
    if not text:
        return []
    return [s for s in _SENTENCE_END.split(text) if s]


def read_text_documents(
    paths: str | Path | Sequence[str | Path], *, document_per: DocumentPer = "block"
) -> Iterator[Document]:
    """Yield the documents of plain UTF-8 text files, one file after another, lazily.

    document_per="block": a document is a run of non-empty lines ended by a blank
    line or the end of the file; each line is one sentence.
    document_per="line": each non-empty line is one document, split into sentences.
    """
    if document_per not in ("block", "line"):
        raise ValueError(f"document_per must be 'block' or 'line', got {document_per!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
    for path in paths:
        with path.open("r", encoding="utf-8", errors="replace") as lines:
            if document_per == "line":
                for line in lines:
                    sentences = split_sentences(line)
                    if sentences:
                        yield sentences
                continue
            block: Document = []
            for line in lines:
                line = _WHITESPACE.sub(" ", line).strip()
                if line:
                    block.append(line)
                elif block:
                    yield block
                    block = []
            if block:
                yield block


def _own_docstring(obj: object) -> str | None:
    """obj's own docstring (not one inherited through inspect.getdoc), cleaned."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _module_docstrings(module_name: str) -> Iterator[str]:
    """The module's docstring, then those of its public classes (and their public
    methods) and functions defined in it, in sorted name order."""
    module = importlib.import_module(module_name)
    yield from filter(None, [_own_docstring(module)])
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Re-exports (e.g. os.path names inside os) belong to their own module.
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield from filter(None, [_own_docstring(obj)])
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                # Methods other packages attach at import time (transformers adds
                # logging.Logger.warning_once) would make the corpus depend on what the
                # process imported; C methods name no module and are kept.
                origin = getattr(member.fget if isinstance(member, property) else member, "__module__", None)
                if isinstance(origin, str) and origin != module.__name__:
                    continue
                if inspect.isroutine(member) or isinstance(member, property):
                    yield from filter(None, [_own_docstring(member)])


def stdlib_docstring_documents(modules: Iterable[str] = STDLIB_CORPUS_MODULES) -> Iterator[Document]:
    """The default corpus: one document per module, made of its docstrings' sentences.

    A docstring that appears twice (shared by aliases or re-exports) is kept once,
    at its first appearance. Modules that fail to import on this platform are skipped.
    """
    seen: set[str] = set()
    for module_name in modules:
        document: Document = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules still have fine docstrings
            try:
                docstrings = list(_module_docstrings(module_name))
            except ImportError:
                continue
        for doc in docstrings:
            if doc in seen:
                continue
            seen.add(doc)
            # Paragraphs first, so a sentence never spans a code sample and prose.
            for paragraph in re.split(r"\n\s*\n", doc):
                document.extend(split_sentences(paragraph))
        if document:
            yield document
