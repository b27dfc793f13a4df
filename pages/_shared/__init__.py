"""Streamlit code shared by the dashboard's pages, one module per seam: `selection` (the read model
and the sidebar selection kept in the URL), `widgets` (settings widgets, page widgets the URL keeps)
and `layout` (page setup and navigation, the header, figures and tables with downloads).

A package, not a module: Streamlit 1.67 turns every pages/*.py except dot-files and __init__.py into
a page ("_"-prefixed files included, see `_mpa_v1` in streamlit/runtime/scriptrunner/
script_runner.py), while it ignores folders. Pages use the pages/ folder (not st.navigation): with
both, AppTest replays the folder's legacy navigation around st.navigation at every run and loses
widget state between runs.
"""
