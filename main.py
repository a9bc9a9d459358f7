"""Train or evaluate a DETR-family detector: ``python main.py --help``; no arguments runs the demo."""
from detr_ssl.__main__ import main

if __name__ == "__main__":
    main()
