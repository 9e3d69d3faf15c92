"""Stage 8, report: a run directory's files → ``report.md`` and a self-contained ``report.html``
(figures, tables), and ``explain`` (a model's filters and feature maps on an image).

Presentation only: it reads what the stages wrote and never reaches back into the search."""
