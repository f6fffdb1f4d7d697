"""Where training rows come from: raw metadata -> our caption table (parquet) that the download stage reads.

    yfcc.py          YFCC100M metadata (25/23-column TSV, plain or compressed) + OpenAI's subset list
    yfcc_blocks.py   its reading in blocks of whole lines (memory-mapped or streamed), parsed in parallel
    yfcc_parse.py    the vectorised parse + SLIP cleaning of one block (equal to yfcc.reference_row)
    yfcc_parquet.py  the same table from a parquet mirror with YFCC100M's column names
    yfcc_chunks.py   the same filter over byte ranges of one file (a cluster's tasks)
    captions.py      any url + caption table (CC3M / CC12M TSVs, CSV, parquet)
    detect.py        which of these a source file is
"""


class BadInput(ValueError):
    """A source that cannot be read at all: missing, truncated or corrupt, or without one well-formed row.
    Its message is one line naming the file and what is wrong (the CLIs print it and exit 2)."""
