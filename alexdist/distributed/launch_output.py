"""What `alexdist launch` shows of `accelerate launch`'s stderr: everything the ranks print, without the
launcher's own reports, which repeat in 35 lines what the failed rank said in one:

- Accelerate's "The following values were not passed to `accelerate launch`" block (the defaults it used);
- torchrun's log lines about shutting the workers down ("Sending process N closing signal", "failed (exitcode:
  N)", "Received N death signal");
- torchrun's ChildFailedError report, with Accelerate's traceback or alone (`--quiet`);
- after a rank's `alexdist: error:` line, another rank's "lost contact with the other processes" line.

The reports are kept in `dropped`: when no rank explains a failure, they are all there is to show. Lines are
judged whole; a partial line (a progress bar redrawn with \\r) is passed on when the stream pauses, unless it
could begin a report.
"""

from __future__ import annotations

import re

DEFAULTS_START = "The following values were not passed to `accelerate launch`"
DEFAULTS_END = "To avoid this warning pass in values"
TRACEBACK = "Traceback (most recent call last):"
# (Accelerate's one-process launcher raises CalledProcessError only without --quiet, which alexdist launch always
# passes: a CalledProcessError traceback is then a rank's own, e.g. a compiler's, and is shown.)
LAUNCHER_ERRORS = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError",)
AGENT_LOG = re.compile(r"[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/\S+\] "
                       r"(Sending process \d+ closing signal|failed \(exitcode: |Received \S+ death signal)")
RULE = re.compile(r"={40,}")  # the borders of torchrun's report
ERROR = "alexdist: error: "
# Once a rank has said why the run failed, the others' "lost contact" is its consequence: a peer waiting in a
# collective notices the failed rank's exit (it printed first: its line is in the stream before they notice).
LOST_CONTACT = re.compile(r"alexdist: error: rank \d+ lost contact with the other processes")
MAY_START_A_REPORT = re.compile(r"[IWE]\d{0,4}( |$)|=|torch\.|subprocess\.")


class LauncherOutput:
    """Feed it the launcher's stderr as it comes (`feed`, `flush_partial` when the stream pauses, `close` at its
    end); each call returns the text to show now."""

    def __init__(self) -> None:
        self.dropped: list[str] = []  # the launcher's failure reports
        self._partial = ""  # text after the last newline, not shown yet
        self._open = False  # the start of the current line was shown: the rest follows unjudged
        self._held: list[str] = []  # lines that may turn out to be a report
        self._mode: str | None = None  # defaults, traceback, blank, rule, after_error, report
        self._explained = False  # an `alexdist: error:` line was shown

    @property
    def explained(self) -> bool:
        """Whether an `alexdist: error:` line was shown."""
        return self._explained

    def feed(self, text: str) -> str:
        out = []
        if self._open:
            head, newline, text = text.partition("\n")
            out.append(head + newline)
            self._open = not newline
            if self._open:
                return "".join(out)
        text = self._partial + text
        cut = text.rfind("\n") + 1
        self._partial = text[cut:]
        for line in text[:cut].split("\n")[:-1]:  # not splitlines: a \r redraws a line, it does not end one
            out.append(self._line(line + "\n"))
        return "".join(out)

    def flush_partial(self) -> str:
        """The unfinished line, if nothing is held back and it cannot begin a report (e.g. a progress bar)."""
        start = self._partial.lstrip("\r")
        if not self._partial or self._mode is not None or MAY_START_A_REPORT.match(start) \
                or DEFAULTS_START.startswith(start) or TRACEBACK.startswith(start):
            return ""
        out, self._partial, self._open = self._partial, "", True
        return out

    def close(self) -> str:
        """At the end of the stream: whatever was held back that was not a report."""
        held = "" if self._mode == "report" else "".join(self._held)
        out, self._partial, self._held, self._mode = held + self._partial, "", [], None
        return out

    def _line(self, line: str) -> str:
        text = line.rstrip("\r\n")
        mode = self._mode
        if mode == "defaults":
            if text.startswith("\t"):
                return ""
            self._mode = None
            return "" if text.startswith(DEFAULTS_END) else self._line(line)
        if mode == "report":
            return self._drop(line, None if RULE.fullmatch(text) else "report")
        if mode == "after_error":  # after a launcher error's exception line: its report may follow
            self._mode = None
            return self._drop(line, "report") if RULE.fullmatch(text) else self._line(line)
        if mode == "traceback":
            if text.startswith((" ", "\t")) or not text:
                self._held.append(line)
                return ""
            if text.startswith(LAUNCHER_ERRORS):
                return self._drop(line, "after_error")
            return self._release(line, judge=False)
        if mode == "blank":
            if not text or RULE.fullmatch(text):
                self._held.append(line)
                self._mode = "blank" if not text else "rule"
                return ""
            return self._release(line)
        if mode == "rule":
            return self._drop(line, "report") if text.endswith(" FAILED") else self._release(line)
        return self._start(line, text)

    def _release(self, line: str, judge: bool = True) -> str:
        """Show what was held, then `line`: judged afresh, or as the end of the held block."""
        held, self._held, self._mode = "".join(self._held), [], None
        return held + (self._line(line) if judge else line)

    def _drop(self, line: str, mode: str | None) -> str:
        self.dropped += [*self._held, line]
        self._held, self._mode = [], mode
        return ""

    def _start(self, line: str, text: str) -> str:
        """A line outside any block: show it, drop it, or hold it while it may begin a report."""
        if text.startswith(DEFAULTS_START):
            self._mode = "defaults"
            return ""
        if AGENT_LOG.match(text) or (self._explained and LOST_CONTACT.match(text)):
            self.dropped.append(line)
            return ""
        self._explained = self._explained or text.startswith(ERROR)
        mode = "traceback" if text == TRACEBACK else "blank" if not text else "rule" if RULE.fullmatch(text) else None
        if mode:
            self._held, self._mode = [line], mode
            return ""
        return line
