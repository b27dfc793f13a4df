"""circuitdiff dashboard: `make dashboard`, or `streamlit run app.py [-- --read-only]`.

Runs before every page: it draws the sidebar selection (kept in the URL's query string) and lists
the pages. Read-only mode (`-- --read-only` or CIRCUITDIFF_READ_ONLY=1) leaves out Compute, for
presenting. The pages read the result cache (CIRCUITDIFF_CACHE, else cache/circuitdiff.duckdb) only
through core.query; nothing here imports a model library.
"""

import streamlit as st

from pages import _shared

st.set_page_config(page_title="circuitdiff", page_icon=":material/difference:", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/table_chart:", default=True),
    st.Page("pages/heatmap.py", title="Edge heatmap", icon=":material/grid_on:"),
    st.Page("pages/distributions.py", title="Distributions", icon=":material/bar_chart:"),
    st.Page("pages/circuit.py", title="Circuit graph", icon=":material/account_tree:"),
    st.Page("pages/samples.py", title="Samples", icon=":material/article:"),
]
if not _shared.read_only():
    PAGES.append(st.Page("pages/compute.py", title="Compute", icon=":material/play_circle:"))

page = st.navigation(PAGES)
_shared.sidebar()
if _shared.read_only():
    st.sidebar.caption("Read-only mode: Compute is hidden.")
page.run()
