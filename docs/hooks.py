"""MkDocs hooks: serve ``benchmarks/RESULTS.md`` and its figures as part of the site, where the repository has them.

The benchmark results stay in ``benchmarks/`` (one copy of every number); the docs link to them as
``../benchmarks/RESULTS.md``, which works on GitHub. This hook adds those files to the site at
``benchmarks/...`` and rewrites such links to it, so MkDocs still checks every one (a link to a file
that does not exist stays broken and fails ``mkdocs build --strict``). The docstrings' Sphinx roles
(``:class:`X` ``) render as the code name alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SERVED = ["benchmarks/RESULTS.md", "benchmarks/figures/**/*.png", "benchmarks/figures/**/*.svg"]
LINK = re.compile(r"(\]\()([^)\s#]+)")
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?=<code>)")


def on_files(files: Files, config) -> Files:
    """Add the served benchmark files to the site, at their paths in the repository."""
    for pattern in SERVED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Point links that reach ``benchmarks/`` from a page's real location at the served copies."""
    real = Path(page.file.abs_src_path).parent
    virtual = Path(config["docs_dir"]) / Path(page.file.src_uri).parent

    def serve(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[a-z]+:", target):
            return match.group(0)
        resolved = (real / target).resolve()
        if not resolved.is_relative_to(ROOT / "benchmarks"):
            return match.group(0)
        served = Path(config["docs_dir"]) / resolved.relative_to(ROOT)
        return match.group(1) + Path(os.path.relpath(served, virtual)).as_posix()

    return LINK.sub(serve, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """Drop the Sphinx role prefix of the docstrings' cross-references, keeping the name as code."""
    return SPHINX_ROLE.sub("", html)
