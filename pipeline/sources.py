"""Expand curate SOURCE arguments into a sorted list of source paths.

A source argument is a video file, a directory (searched recursively for video extensions), a glob
(a directory it matches is searched the same way), or a manifest (`*.txt` / `*.manifest`: one path
per line, relative paths resolved under the manifest's directory). Manifest paths that escape
their root (`..`, absolute paths elsewhere, symlinks pointing out) are not followed: they come back
as rejected entries with a reason, so they still appear as rows in the table.

A directory or glob that holds the dataset root being curated into (`exclude`) does not reach into
it: its media/ clips are the dataset's output, and a rerun would have curated them as new sources.
`exclude` may name several roots (a rebuild skips both the root it rebuilds and the one it writes).
"""
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp",
              ".mts", ".m2ts", ".mxf", ".ogv", ".vob"}  # (AVCHD cameras, broadcast MXF, Theora, DVD)
MANIFEST_EXTS = {".txt", ".manifest", ".lst"}


@dataclass(frozen=True)
class Source:
    uri: str                       # absolute path (or the raw manifest line when rejected)
    reject: Optional[str] = None   # set when the entry can't even be opened safely


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, RuntimeError, OSError):  # RuntimeError: symlink loop
        return False


def _read_manifest(manifest: Path) -> list[Source]:
    root = manifest.parent
    out = []
    # decoded as the OS decodes file names: a non-UTF-8 name opens as the same bytes
    data = manifest.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is no part of a name
    for line in os.fsdecode(data).splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("file://"):  # a URI percent-encodes its path: "my%20clip.mp4" names "my clip.mp4"
            entry = unquote(entry[len("file://"):].removeprefix("localhost"), errors="surrogateescape")
        if "://" in entry:
            out.append(Source(entry, f"unsupported URI scheme: {entry.split('://')[0]}"))
            continue
        path = Path(entry) if os.path.isabs(entry) else root / entry
        if not _within(path, root):
            out.append(Source(entry, f"manifest path escapes its root {root}: {entry}"))
            continue
        out.append(Source(_normal(path)))
    return out


def _normal(path: Path) -> str:
    """An absolute path without "." / ".." steps, as a directory walk names the file: "sub/../a.mp4"
    was a second source uri for a.mp4, rejected as identical content to itself. Kept as written
    where dropping ".." would name another file (the step before it is a symlink)."""
    norm = os.path.abspath(path)
    return norm if Path(norm).resolve() == path.resolve() else str(path.absolute())


def _walk(directory: Path, exclude: tuple[Path, ...] = ()) -> list[Source]:
    out = []
    # followlinks=False: a symlink loop in a directory tree can't trap the walk; a symlinked file
    # that points outside the directory is not followed either.
    for dirpath, dirs, files in os.walk(directory, followlinks=False):
        if exclude:
            dirs[:] = [d for d in dirs if Path(dirpath, d).resolve() not in exclude]
        for name in files:
            if Path(name).suffix.lower() in VIDEO_EXTS:
                path = Path(os.path.abspath(dirpath)) / name
                out.append(Source(str(path)) if _within(path, directory)
                           else Source(str(path), f"symlink escapes its root {directory}: {name}"))
    return out


def expand_sources(args: list[str], exclude: Optional[str | Path | list] = None) -> list[Source]:
    """Each argument -> Sources; sorted and de-duplicated by uri so runs are deterministic.
    `exclude`: the dataset root(s) curated into, which directories and globs do not reach into."""
    exclude = tuple(Path(e).resolve() for e in ([] if exclude is None else
                                                 exclude if isinstance(exclude, (list, tuple)) else [exclude]))
    found: list[Source] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found += _walk(p, exclude)
        elif p.suffix.lower() in MANIFEST_EXTS and p.is_file():
            found += _read_manifest(p)
        elif any(ch in arg for ch in "*?[") and not os.path.lexists(arg):  # "Title [id].mp4" is a file
            matches = [m for m in sorted(glob.glob(arg, recursive=True))
                       if not any(_within(Path(m), e) for e in exclude)]
            if not matches:
                found.append(Source(arg, "glob matched no files"))
            for m in matches:
                if os.path.isdir(m):  # walked like a directory argument: "footage/day*" names its videos
                    found += _walk(Path(m), exclude)
                elif os.path.isfile(m):
                    found.append(Source(os.path.abspath(m)))
        else:
            # A plain path; a missing one becomes a rejected row downstream (probe says "missing file").
            found.append(Source(os.path.abspath(arg)))
    unique = {s.uri: s for s in found}
    return [unique[k] for k in sorted(unique)]
