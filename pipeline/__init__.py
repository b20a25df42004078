"""weightsmith: convert a Hugging Face checkpoint into deployable artifacts and prove each one works.

The library (this package) runs without Prefect; `flows/` wraps its steps as Prefect tasks.
"""

__version__ = "0.1.0"
