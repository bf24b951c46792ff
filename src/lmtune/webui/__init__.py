"""`lmtune webui`: a page on 127.0.0.1 that trains, chats, compares and exports through lmtune's own
commands. app.py holds the routes, runs.py the training runs, static/ the page (no build step, no
network: plain HTML, CSS and JavaScript served from the package)."""
