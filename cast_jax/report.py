"""A run report as markdown plus a self-contained HTML copy (images inlined as base64).

  text = "# Demo\\n\\n![conflict map](diagnosis/heatmap_c.png)\\n\\n| a |\\n|---|\\n| 1 |"
  md_path, html_path = write_report(workdir, text, title="cast-jax demo")

The markdown stays the primary artifact (links and images are relative to the workdir, so it
renders in place); the HTML carries every image inside it, so it can be mailed or opened from
anywhere. The converter covers the subset the launch reports write: ATX headings, paragraphs,
pipe tables, "- " lists, fenced code, images, links, `code` and **bold**. No third-party
markdown package: the main command's environment installs none.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
import re

from cast_jax import workdir as wd

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "line-height:1.45}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        "code{background:#f3f3f3;padding:0 3px}pre{background:#f6f6f6;padding:8px;overflow:auto}")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _data_uri(path: str) -> str | None:
  """`data:<mime>;base64,...` of a file, or None when it does not exist."""
  if not os.path.isfile(path):
    return None
  mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
  with open(path, "rb") as f:
    return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def _inline(text: str, base_dir: str, inline_images: bool) -> str:
  """One line of markdown inline syntax -> HTML (escaped; images inlined from base_dir)."""
  out, pos = [], 0
  # Code spans first: their content is literal.
  for m in re.finditer(r"`([^`]+)`", text):
    out.append(_inline_plain(text[pos:m.start()], base_dir, inline_images))
    out.append(f"<code>{html.escape(m.group(1))}</code>")
    pos = m.end()
  out.append(_inline_plain(text[pos:], base_dir, inline_images))
  return "".join(out)


def _inline_plain(text: str, base_dir: str, inline_images: bool) -> str:
  pieces, pos = [], 0
  for m in re.finditer(f"{_IMAGE.pattern}|{_LINK.pattern}", text):
    pieces.append(_emphasis(html.escape(text[pos:m.start()])))
    if m.group(0).startswith("!"):
      alt, src = m.group(1), m.group(2)
      uri = _data_uri(os.path.join(base_dir, src)) if inline_images else None
      pieces.append(f'<img alt="{html.escape(alt)}" src="{html.escape(uri or src)}">')
    else:
      label, href = m.group(3), m.group(4)
      pieces.append(f'<a href="{html.escape(href)}">{_emphasis(html.escape(label))}</a>')
    pos = m.end()
  pieces.append(_emphasis(html.escape(text[pos:])))
  return "".join(pieces)


def _emphasis(escaped: str) -> str:
  return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str, base_dir: str = ".", *, title: str = "report",
                     inline_images: bool = True) -> str:
  """A whole HTML page for `text` (module doc's markdown subset).

  Args:
    text: the markdown.
    base_dir: the dir image paths are relative to (the markdown file's dir).
    title: the page's <title>.
    inline_images: embed each existing image as a base64 data URI (a missing one keeps its
      path, so the page still says what was meant).
  Returns:
    The HTML document as a string.
  """
  lines = text.splitlines()
  body, i = [], 0
  while i < len(lines):
    line = lines[i]
    if not line.strip():
      i += 1
      continue
    if line.startswith("```"):
      j = i + 1
      while j < len(lines) and not lines[j].startswith("```"):
        j += 1
      body.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
      i = j + 1
      continue
    heading = re.match(r"^(#{1,6})\s+(.*)$", line)
    if heading:
      n = len(heading.group(1))
      body.append(f"<h{n}>{_inline(heading.group(2), base_dir, inline_images)}</h{n}>")
      i += 1
      continue
    if line.lstrip().startswith("|") and i + 1 < len(lines) and \
        re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
      head = _cells(line)
      rows, j = [], i + 2
      while j < len(lines) and lines[j].lstrip().startswith("|"):
        rows.append(_cells(lines[j]))
        j += 1
      cell = lambda c, tag: f"<{tag}>{_inline(c, base_dir, inline_images)}</{tag}>"
      body.append("<table><thead><tr>" + "".join(cell(c, "th") for c in head) + "</tr></thead>"
                  "<tbody>" + "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>"
                                      for r in rows) + "</tbody></table>")
      i = j
      continue
    if re.match(r"^\s*[-*]\s+", line):
      items, j = [], i
      while j < len(lines) and re.match(r"^\s*[-*]\s+", lines[j]):
        items.append(re.sub(r"^\s*[-*]\s+", "", lines[j]))
        j += 1
      body.append("<ul>" + "".join(f"<li>{_inline(x, base_dir, inline_images)}</li>"
                                   for x in items) + "</ul>")
      i = j
      continue
    para, j = [], i
    while j < len(lines) and lines[j].strip() and not re.match(
        r"^(#{1,6}\s|```|\s*\||\s*[-*]\s+)", lines[j]):
      para.append(lines[j])
      j += 1
    body.append("<p>" + _inline(" ".join(para), base_dir, inline_images) + "</p>")
    i = j
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
          + "\n".join(body) + "\n</body></html>\n")


def write_report(workdir: str, markdown: str, *, title: str = "report",
                 name: str = "report") -> tuple[str, str]:
  """Writes `<workdir>/<name>.md` and the self-contained `<name>.html`, each atomically.

  Image paths in `markdown` are relative to `workdir`. Returns (md path, html path).
  """
  md_path = wd.atomic_write_bytes(os.path.join(workdir, f"{name}.md"), markdown.encode())
  page = markdown_to_html(markdown, workdir, title=title)
  html_path = wd.atomic_write_bytes(os.path.join(workdir, f"{name}.html"), page.encode())
  return md_path, html_path
