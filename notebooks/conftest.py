"""nbval settings: compare text outputs, not HTML or widget views (they embed ids that change)."""


def pytest_collectstart(collector):  # type: ignore[no-untyped-def]  # pytest hook signature
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "text/html",
            "application/javascript",
            "application/vnd.jupyter.widget-view+json",
            "image/png",
            "image/svg+xml",
            "stderr",
        )
