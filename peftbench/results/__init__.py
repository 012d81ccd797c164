"""Results: the leaderboard as data (``board.py``), its columns declared once (``columns.py``), the
papers' reported numbers (``reference.py`` + ``reference/*.csv``), plots (``plots.py``), the HTML
report (``report.py``), and the writer of a suite's files (``write.py``)."""
