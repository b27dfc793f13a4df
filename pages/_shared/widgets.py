"""Widgets: one per field of a settings class (from its `field_specs()`), and page widgets whose
value the URL keeps (`linked` before the widget, `link` after it)."""

from __future__ import annotations

from typing import Any, Callable

import streamlit as st

from core.settings import Settings, SettingsError


def parse(text: str, kind: str) -> Any:
    """A URL parameter's text as a settings field of type `kind` (bool, int, float or str)."""
    if kind == "bool":
        return text.lower() in ("1", "true", "yes", "on")
    return {"int": int, "float": float}.get(kind, str)(text)


def parse_bool(text: str) -> bool:
    return parse(text, "bool")


def settings_widgets(cls: type[Settings], prefix: str) -> Settings:
    """One widget per field of a settings class, keyed `prefix.field`, in the current container;
    returns the settings, or the defaults with an error shown when the combination is invalid."""
    values = {}
    for spec in cls.field_specs():
        name = spec["name"]
        key = f"{prefix}.{name}"
        # Re-assigned at every run: the same key on another page is another widget, which takes
        # its value from here (so a choice survives page switches).
        st.session_state[key] = st.session_state.get(key, spec["default"])
        label = name.replace("_", " ")
        if spec["choices"] is not None:
            if st.session_state[key] not in spec["choices"]:
                st.session_state[key] = spec["default"]
            values[name] = st.selectbox(label, spec["choices"], key=key, help=spec["help"])
        elif spec["type"] == "bool":
            values[name] = st.checkbox(label, key=key, help=spec["help"])
        elif spec["type"] in ("int", "float"):
            cast = int if spec["type"] == "int" else float
            low = None if spec["low"] is None or spec["low_open"] else cast(spec["low"])
            high = None if spec["high"] is None else cast(spec["high"])
            values[name] = st.number_input(
                label, min_value=low, max_value=high, key=key, help=spec["help"],
                step=1 if cast is int else 0.01, format=None if cast is int else "%g")
        else:
            values[name] = st.text_input(label, key=key, help=spec["help"])
    try:
        return cls(**values)
    except SettingsError as error:
        st.error(f"{error} Using the defaults until it is fixed.")
        return cls()


def linked(key: str, options=None, parse: Callable[[str], Any] = str) -> None:
    """Before a page widget keyed `key` (one of the page's `page_header(links=...)`): the first time
    in a session, take its value from the link, if it parses and is one of `options`."""
    flag = f"_linked.{key}"
    if st.session_state.get(flag):
        return
    st.session_state[flag] = True
    if key not in st.query_params:
        return
    try:
        value = parse(st.query_params[key])
    except ValueError:
        return
    if options is None or value in options:
        st.session_state[key] = value


def link(key: str, value: Any) -> None:
    """After a page widget keyed `key`: its value goes into the URL, so a link reopens this view."""
    text = str(value)
    if st.query_params.get(key) != text:
        st.query_params[key] = text
