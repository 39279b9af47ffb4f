"""The assignment masters are scripts that run a whole lecture (models, plots): pytest must not import them,
as --doctest-modules would. nbval runs the notebooks generated from them (student/ and solutions/)."""

collect_ignore_glob = ["masters/*.py"]
