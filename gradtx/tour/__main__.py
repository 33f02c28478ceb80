"""``python -m gradtx.tour``: runs the tour (see :mod:`gradtx.tour`)."""

from gradtx.tour import main

if __name__ == "__main__":
  main()
