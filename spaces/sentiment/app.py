"""Hugging Face Space: Korean movie review sentiment with the nsmc task's prompt and choices (see README.md).

Only wiring: the app lives in `hubkit.demo`. Locally: `python app.py` (http://127.0.0.1:7860); a
prompt-tuning adapter comes from `HUBKIT_ADAPTER=DIR` (see README.md).
"""

from hubkit.demo import run_demo

if __name__ == "__main__":
    run_demo("sentiment")
