"""``python -m oodseg.data.synthetic --out DIR``: build (or reuse) the synthetic suite."""

from oodseg.data.synthetic.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
