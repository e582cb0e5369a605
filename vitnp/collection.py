"""The image collections of ``vitnp embed``: a folder, a glob, a text file of paths, or any of these as an fsspec URL,
listed as the sorted paths of distinct images; and an image of the list opened for reading.

Folder searches and globs enter no symlinked folder (a link to a parent folder makes a cycle), and a file reached by
two names is one image.
"""

import fnmatch
import glob
import io
import os

from .predict import IMAGE_SUFFIXES

SCALE_HINT = "pip install 'vitnp[scale]'"


def is_url(path):
    """Is ``path`` a URL fsspec opens (``s3://``, ``memory://``, ...)? ``file://`` URLs are local paths."""
    return "://" in path and not path.startswith("file://")


def local_path(path):
    """A local path or a ``file://`` URL (``file:///abs/path``, ``file://localhost/abs/path``) as an absolute path."""
    if path.startswith("file://"):
        host, slash, rest = path.removeprefix("file://").partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"{path} names a file on another host ({host}): give a path this machine can read")
        path = slash + rest
    return os.path.abspath(path)


def list_images(source):
    """SOURCE -> the sorted list of distinct image paths (absolute) or URLs.

    SOURCE is a folder (its image files, searched recursively), a glob pattern (``**`` crosses folders), a text file
    of paths or URLs (one a line; blank lines and ``#`` comments skipped; relative paths are relative to the text
    file's folder), one image file, a list of paths, or any of these as an fsspec URL (``s3://bucket/images/``).
    Files a text file or a list names are kept even when missing: reading them records the error. Folder searches and
    globs do not enter symlinked folders (a link to a parent folder would list its images again and again), and a
    file reached by two names (a symlink to another listed file) is listed once, under its own name.
    """
    if isinstance(source, (list, tuple)):
        paths = [p if is_url(p) else local_path(p) for p in map(os.fspath, source)]
    elif is_url(source):
        paths = _list_url(source)
    else:
        paths = _list_local(local_path(source), source)
    return _distinct_files(paths)


def _distinct_files(paths):
    """``paths`` sorted, each file once: of the names a local file is reached by (symlinks to it), its own when listed,
    else the first link's."""
    resolved_folders = {}

    def real_path(path):  # realpath of the folder once per folder, of the file only when it is a link
        folder, name = os.path.split(path)
        if folder not in resolved_folders:
            resolved_folders[folder] = os.path.realpath(folder)
        joined = os.path.join(resolved_folders[folder], name)
        return (os.path.realpath(joined), True) if os.path.islink(joined) else (joined, False)

    chosen = {}  # real path -> (is a link, name)
    for path in paths:
        key, is_link = (path, False) if is_url(path) else real_path(path)
        chosen[key] = min(chosen.get(key, (is_link, path)), (is_link, path))
    return sorted(path for _, path in chosen.values())


def _is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk_files(folder):
    """The paths of every file under ``folder`` (symlinks to files too), entering no symlinked folder."""
    return [os.path.join(parent, name) for parent, _, names in os.walk(folder, followlinks=False) for name in names]


def _glob_files(pattern):
    """The files matching a glob pattern (``**``: any number of folders), like ``glob.glob(pattern, recursive=True)``
    (names starting with '.' match only a part that starts with '.') but entering no symlinked folder."""
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or os.sep
    wanted = parts[fixed:]
    before_any_depth = wanted.index("**") if "**" in wanted else len(wanted)
    found = []
    for parent, folders, names in os.walk(root, followlinks=False):
        depth = 0 if parent == root else os.path.relpath(parent, root).count(os.sep) + 1
        if depth < before_any_depth:  # above the first '**', enter only the folders the pattern's part matches
            folders[:] = [name for name in folders if depth < len(wanted) - 1 and _part_match(wanted[depth], name)]
        found.extend(os.path.join(parent, name) for name in names)
    return [path for path in found
            if _glob_match(wanted, os.path.relpath(path, root).split(os.sep)) and os.path.isfile(path)]


def _part_match(pattern_part, name):
    return fnmatch.fnmatchcase(name, pattern_part) and (pattern_part.startswith(".") or not name.startswith("."))


def _glob_match(pattern_parts, path_parts):
    """Does a path (its parts) match a glob pattern (its parts, ``**`` standing for zero or more folders)?"""
    if not pattern_parts:
        return not path_parts
    first, rest = pattern_parts[0], pattern_parts[1:]
    if first == "**":
        return any(_glob_match(rest, path_parts[skip:]) for skip in range(len(path_parts) + 1)
                   if not any(part.startswith(".") for part in path_parts[:skip]))
    return bool(path_parts) and _part_match(first, path_parts[0]) and _glob_match(rest, path_parts[1:])


def _list_local(path, source):
    if os.path.isdir(path):
        return [file for file in _walk_files(path) if _is_image(file)]
    if os.path.isfile(path):
        if _is_image(path):
            return [path]
        try:
            with open(path, encoding="utf-8") as f:
                return _paths_of_list(f.read(), os.path.dirname(path))
        except UnicodeDecodeError as error:
            raise ValueError(f"SOURCE {source} is neither an image file ({', '.join(IMAGE_SUFFIXES)}) nor a text "
                             "file of paths") from error
    if glob.has_magic(path):
        return _glob_files(path)
    raise ValueError(f"SOURCE {source} is neither a folder, an image, a text file of paths nor a glob that matches")


def _paths_of_list(text, folder):
    """The paths of a text file's lines: URLs as they are, ``file://`` URLs as local paths, other paths joined to
    ``folder`` (a local folder or a URL) when relative."""
    lines = [line.strip() for line in text.splitlines()]
    paths = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        path = line if is_url(line) or line.startswith("file://") else os.path.join(folder, line)
        paths.append(path if is_url(path) else local_path(path))
    return paths


def _fsspec():
    try:
        import fsspec
    except ImportError as error:
        raise ValueError(f"reading URLs needs fsspec: {SCALE_HINT}") from error
    return fsspec


def _list_url(source):
    """The images under a URL: a folder's (recursively), a glob's or a text file's, as full URLs."""
    fsspec = _fsspec()
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if glob.has_magic(path):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _is_image(p)]
        elif fs.isfile(path) and not _is_image(path):
            with fs.open(path, "rt", encoding="utf-8") as f:
                return _paths_of_list(f.read(), fs.unstrip_protocol(os.path.dirname(path)))
        elif fs.isfile(path):
            found = [path]
        else:
            raise ValueError(f"SOURCE {source} is neither a folder, an image, a text file of paths nor a glob that "
                             "matches")
    except ImportError as error:  # fsspec knows the protocol, its package (s3fs, gcsfs, ...) is not installed
        raise ValueError(f"cannot read {source}: {error}") from error
    except OSError as error:
        raise ValueError(f"cannot list {source}: {error}") from error
    return [fs.unstrip_protocol(p) for p in found]


class _NamedBytes(io.BytesIO):
    """An image file fetched from a URL, as bytes; prints as its URL so that read errors name it."""

    def __init__(self, url, data):
        super().__init__(data)
        self.url = url

    def __str__(self):
        return self.url


def image_source(path):
    """A local path as it is; a URL fetched with fsspec (an OSError when that fails)."""
    if not is_url(path):
        return path
    with _fsspec().open(path, "rb") as f:
        return _NamedBytes(path, f.read())
