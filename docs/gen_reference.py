"""Writes the configuration reference page from the schema when the site builds (mkdocs-gen-files)."""

import mkdocs_gen_files

from pipeline.config import reference

with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
    page.write(reference.markdown())
