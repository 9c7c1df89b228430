"""book/_ext/offline_assets.py rewrites what plotly's notebook_connected renderer emits."""

import importlib.util
from pathlib import Path

import plotly.graph_objects as go
from plotly.io._renderers import renderers

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("offline_assets", ROOT / "book" / "_ext" / "offline_assets.py")
offline_assets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_assets)


def _notebook_connected_html():
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    bundle = renderers._build_mime_bundle(fig.to_dict(), renderers_string="notebook_connected")
    return bundle["text/html"]


def test_rewrite_points_plotly_at_the_local_copy_and_drops_cdn_tags():
    html = _notebook_connected_html()
    assert "cdn.plot.ly" in html, "the renderer's output changed; revisit offline_assets"
    out = offline_assets._rewrite(html, "../_static")
    assert "cdn.plot.ly" not in out and "cdnjs.cloudflare.com" not in out
    assert '<script charset="utf-8" src="../_static/plotly.min.js"></script>' in out
    assert not offline_assets.EXTERNAL_ASSET.search(out)


def test_thebe_config_is_kept_once():
    tag = '<script>const THEBE_JS_URL = "x"; const thebe_selector = ".cell"</script>\n'
    out = offline_assets._rewrite("<head>" + tag + "<p>" + tag + "</head>", "_static")
    assert out.count("THEBE_JS_URL") == 1


def test_external_asset_pattern_catches_scripts_and_stylesheets_but_not_links():
    assert offline_assets.EXTERNAL_ASSET.search('<script src="https://unpkg.com/x.js"></script>')
    assert offline_assets.EXTERNAL_ASSET.search('<link rel="stylesheet" href="https://fonts.example/x.css">')
    assert not offline_assets.EXTERNAL_ASSET.search('<a href="https://colab.research.google.com/github/x">')
