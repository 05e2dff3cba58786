#!/usr/bin/env python3
"""Checks that every command, flag and environment variable of msb is exercised by at least one
test through the msb binary, so that a new command or flag cannot ship untested. Run by CTest:

    python3 tests/check_cli_coverage.py MSB_BINARY SOURCE_DIR

What must be exercised:
  commands   every path in the "Subcommands:" sections of `msb --help`, `msb store --help`, ...
             ("store put"), parsed as tests/check_docs.sh parses them: a name at an indent of
             exactly two spaces; a section ends at the next unindented line.
  flags      every option in each command's "Options:" section. One form of a flag is enough
             ("-f" or "--force"): both forms set the same option in CLI11, and which spelling a
             test uses says nothing about the behaviour behind it. -h/--help is on every command
             and counts once, as a global option.
  global     the options of `msb --help` (--home, -q/--quiet, --version, -h/--help). msb accepts
             them before or after the subcommand, so they count anywhere in an argv of msb.
  variables  those the help mentions ("$MSB_HOME") and those with an entry (a .TP tag) under
             ENVIRONMENT in man/msb.1 (MSB_BOOT_TIMEOUT, http_proxy, ...): the man page must
             name every variable the help names (check_docs.sh), and may name more.

What counts as a test running msb (tests/*.cpp, tests/*.h, tests/*.sh; // and /* */ comments
are removed first, so a mention in a comment never counts):
  * A brace list of C++ elements that contains the identifier MSB_BINARY: the string literals
    after it are msb's argv (run_process({MSB_BINARY, "store", "put", ...}),
    {"/usr/bin/env", "MSB_HOME=...", MSB_BINARY, "logs", ...}).
  * A brace list whose first element is a string literal naming a top-level command or a global
    option: msb({"snapshot", "ls", "--json"}), with_boot_timeout(msb, "2", {"create", ...}).
    A brace list right after ':' (a range-for over words) is not an argv.
  * MSB_BINARY directly followed by a string literal: a shell command line
    ("sleep 3 | '" MSB_BINARY "' exec --timeout 1 box -- cat"); the literal is split into words
    as a shell would, up to the first operator (|, ;, &, <, >).
  * A vector named by a declaration whose initial brace list is such an argv
    (std::vector<std::string> args = {"run", ...}), or into whose front a command's list is
    inserted (args.insert(args.begin(), {"snapshot", "create"})): later push_back, emplace_back
    and insert calls on that name in the same file, up to its next declaration, add their string
    literals to that argv.
  * In shell scripts, a line (continuations joined) with a word that is msb, $msb, ${msb} or a
    path ending in /msb: the words after it, up to the first operator.
Elements that are not plain string literals (variables, expressions) are unknown words: they can
be a command's value or a positional argument, never a command or a flag. In an argv, global
options (with their values) may come first; then the longest run of words that spells a command
path is the command, and the words after it that start with '-' are its flags, as "--flag",
"--flag=VALUE" or "-f", up to a "--" (what follows belongs to the guest's command). A flag that
takes a value (the help shows "--flag TEXT") skips the word after it.

An environment variable counts when a test passes it to msb's environment, as a string literal:
the first element of a two-element brace list (an env map entry: {"MSB_ZSTD_LEVEL", "19"}), the
first argument of setenv, an env map key (env["NAME"], env.emplace("NAME", ...)), or a NAME=...
word before the msb in an argv or a shell line (/usr/bin/env NAME=VALUE msb ...).

tests/cli_coverage_exceptions.txt lists what is exempt, one entry a line, each with a '#'
comment saying why: "COMMAND... [FLAG]", a global "--flag", or "$VARIABLE". An entry that names
nothing msb has, that is covered after all, or that has no comment fails the check too, so the
list cannot rot.

Prints what is covered, one "untested: ..." line for each gap, and exits 1 if there is any.
Python 3 standard library only.
"""

import os
import re
import shlex
import subprocess
import sys

# --- What msb has ---------------------------------------------------------------------------


class Option:
    def __init__(self, forms, takes_value):
        self.forms = forms  # ["-f", "--force"]
        self.takes_value = takes_value

    @property
    def name(self):
        return self.forms[-1]  # the long form, which CLI11 lists last


def help_section(text, header):
    """The entries of section `header` of a CLI11 help text, as (names, rest) pairs: names at an
    indent of exactly two spaces, as tests/check_docs.sh reads them."""
    entries = []
    inside = False
    for line in text.splitlines():
        if line == header:
            inside = True
            continue
        if re.match(r"[^ \t]", line):
            inside = False
        if inside and re.match(r"  [^ ]", line):
            # "--home TEXT    State directory", "-q,--quiet    Print no progress", "--env TEXT ..."
            column = re.split(r"\s{2,}", line[2:], maxsplit=1)[0]
            words = column.split()
            entries.append((words[0], words[1:]))
    return entries


def parse_options(text):
    options = []
    for names, rest in help_section(text, "Options:"):
        forms = [f for f in names.split(",") if f.startswith("-")]
        # A type after the names ("TEXT", "INT") means the option takes a value.
        takes_value = bool(rest) and re.fullmatch(r"[A-Z][A-Z0-9_]*", rest[0]) is not None
        if forms:
            options.append(Option(forms, takes_value))
    return options


def run_help(msb, path):
    argv = [msb] + path + ["--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        sys.exit("failed: %s (exit %d): %s" % (" ".join(argv), result.returncode, result.stderr))
    return result.stdout


def walk(msb):
    """Every command path (tuples of words) with its options, the global options, and the whole
    help text."""
    commands = {}  # ("store", "put") -> [Option]
    children = {(): []}
    texts = []

    def visit(path):
        text = run_help(msb, list(path))
        texts.append(text)
        commands[path] = parse_options(text)
        children[path] = [names for names, _ in help_section(text, "Subcommands:")]
        for sub in children[path]:
            visit(path + (sub,))

    visit(())
    global_options = commands.pop(())
    return commands, children, global_options, "\n".join(texts)


def man_environment(man_page):
    """The variables with a .TP entry under ENVIRONMENT in the man page."""
    names = []
    inside = after_tp = False
    with open(man_page, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith('.\\"'):
                continue
            if line.startswith(".SH"):
                inside = "ENVIRONMENT" in line
                continue
            if inside and after_tp:
                after_tp = False
                # ".B MSB_HOME", '.BR http_proxy ", " https_proxy ", " NO_PROXY'
                for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", re.sub(r"^\.[A-Z]+", "", line)):
                    if "_" in word or word.isupper():
                        names.append(word)
            if inside and line.startswith(".TP"):
                after_tp = True
    return names


# --- Reading the tests ----------------------------------------------------------------------

STRING, IDENT, PUNCT = "string", "ident", "punct"


def cpp_tokens(text):
    """C++ source as (kind, value) tokens with comments dropped; adjacent string literals are one
    token, except where MSB_BINARY stands between them."""
    tokens = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c.isspace():
            i += 1
        elif c == '"' or (c == "R" and text.startswith('R"', i)) or (
                c in "uUL8" and re.match(r'(u8|u|U|L)R?"', text[i:i + 4])):
            prefix = re.match(r'(u8|u|U|L)?(R)?"', text[i:]).group(0)
            i += len(prefix)
            if prefix.endswith('R"'):
                delim_end = text.find("(", i)
                delim = text[i:delim_end]
                close = text.find(")" + delim + '"', delim_end)
                value = text[delim_end + 1:close]
                i = close + len(delim) + 2
            else:
                value = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        escape = text[i + 1]
                        value.append({"n": "\n", "t": "\t", "0": "\0"}.get(escape, escape))
                        i += 2
                    else:
                        value.append(text[i])
                        i += 1
                i += 1
                value = "".join(value)
            if tokens and tokens[-1][0] == STRING:
                tokens[-1] = (STRING, tokens[-1][1] + value)
            else:
                tokens.append((STRING, value))
        elif c == "'":
            # A character literal: skipped whole (its quote must not start a string).
            j = i + 1
            while j < n and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            tokens.append((PUNCT, "char"))
            i = j + 1
        elif c.isalpha() or c == "_":
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
            tokens.append((IDENT, m.group(0)))
            i += len(m.group(0))
        elif c.isdigit():
            m = re.match(r"[0-9][0-9A-Za-z_.']*", text[i:])
            tokens.append((PUNCT, "number"))
            i += len(m.group(0))
        elif text.startswith("::", i):
            tokens.append((PUNCT, "::"))
            i += 2
        else:
            tokens.append((PUNCT, c))
            i += 1
    return tokens


def matching(tokens, start):
    """The index of the bracket closing the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth = 0
    for i in range(start, len(tokens)):
        kind, value = tokens[i]
        if kind != PUNCT:
            continue
        if value in pairs:
            depth += 1
        elif value in pairs.values():
            depth -= 1
            if depth == 0:
                return i
    return len(tokens) - 1


def split_elements(tokens, start, end):
    """The top-level comma-separated elements of the brace list tokens[start..end]."""
    elements, current, depth = [], [], 0
    for kind, value in tokens[start + 1:end]:
        if kind == PUNCT and value in "({[":
            depth += 1
        elif kind == PUNCT and value in ")}]":
            depth -= 1
        if kind == PUNCT and value == "," and depth == 0:
            elements.append(current)
            current = []
        else:
            current.append((kind, value))
    if current:
        elements.append(current)
    return elements


BINARY = object()  # the MSB_BINARY element of an argv


def element_value(element):
    """A string literal's text, BINARY for MSB_BINARY, None for anything else."""
    if len(element) == 1 and element[0][0] == STRING:
        return element[0][1]
    if element == [(IDENT, "MSB_BINARY")]:
        return BINARY
    return None


SHELL_OPERATORS = set("|;&<>()")


def shell_words(text):
    """The words of a shell command line up to its first operator (None for an unknown word)."""
    while True:
        try:
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            break
        except ValueError:
            # An unbalanced quote: the literal ends where C++ code continues the line
            # ("... 2>'" + err + "'"); what came before it is still words.
            cut = max(text.rfind("'"), text.rfind('"'))
            if cut < 0:
                return []
            text = text[:cut]
    out = []
    for word in words:
        if word and set(word) <= SHELL_OPERATORS:
            break
        out.append(None if "$" in word else word)
    return out


class Coverage:
    def __init__(self, commands, children, global_options, variables):
        self.commands = commands
        self.children = children
        self.global_options = global_options
        self.variables = variables
        self.covered_commands = set()
        self.covered_flags = set()  # (path, long form)
        self.covered_globals = set()
        self.covered_variables = set()

    def global_option(self, word):
        for option in self.global_options:
            if word.split("=", 1)[0] in option.forms:
                return option
        return None

    def is_argv_start(self, word):
        return isinstance(word, str) and (
            word in self.children[()] or (word.startswith("-") and self.global_option(word)))

    def record_argv(self, words):
        """Records what an argv of msb (the words after the binary; None for an unknown word)
        exercises. Returns the command path, or None if there is none."""
        i = 0
        # Global options first (msb --home DIR store ls).
        while i < len(words) and isinstance(words[i], str) and words[i].startswith("-"):
            option = self.global_option(words[i])
            if not option:
                break
            self.covered_globals.add(option.name)
            i += 2 if option.takes_value and "=" not in words[i] else 1
        path = ()
        while i < len(words) and words[i] in self.children.get(path, []):
            path += (words[i],)
            i += 1
        for k in range(1, len(path) + 1):
            self.covered_commands.add(path[:k])  # "snapshot ls" exercises "snapshot" too
        options = self.commands.get(path, [])
        while i < len(words):
            word = words[i]
            i += 1
            if not isinstance(word, str) or not word.startswith("-") or word == "-":
                continue
            if word == "--":
                break
            flag = word.split("=", 1)[0]
            match = next((o for o in options if flag in o.forms), None)
            if match:
                self.covered_flags.add((path, match.name))
            elif self.global_option(flag):
                match = self.global_option(flag)
                self.covered_globals.add(match.name)
            if match and match.takes_value and "=" not in word:
                i += 1
        return path or None

    def record_variable(self, name):
        if name in self.variables:
            self.covered_variables.add(name)

    def record_assignments(self, words):
        """NAME=VALUE words (as /usr/bin/env or a shell takes them)."""
        for word in words:
            if isinstance(word, str):
                m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", word)
                if m:
                    self.record_variable(m.group(1))

    # C++ -------------------------------------------------------------------------------------

    def scan_cpp(self, text):
        tokens = cpp_tokens(text)
        tracked = {}  # vector name -> its argv words so far
        for i, (kind, value) in enumerate(tokens):
            prev = tokens[i - 1] if i > 0 else (None, None)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
            # A shell command line: MSB_BINARY "' exec ..." (with the words before it in the
            # literal before it).
            if (kind, value) == (IDENT, "MSB_BINARY") and nxt[0] == STRING:
                self.record_argv(shell_words(nxt[1].lstrip("'\"")))
                if prev[0] == STRING:
                    self.record_assignments(shell_words(prev[1]))
            # Environment: setenv("NAME", ...), env["NAME"], env.emplace("NAME", ...).
            if kind == STRING and prev == (PUNCT, "("):
                before = tokens[i - 2] if i >= 2 else (None, None)
                if before in ((IDENT, "setenv"), (IDENT, "emplace")) and nxt == (PUNCT, ","):
                    self.record_variable(value)
            if kind == STRING and prev == (PUNCT, "[") and nxt == (PUNCT, "]"):
                self.record_variable(value)
            if (kind, value) == (IDENT, "push_back") or (kind, value) == (
                    IDENT, "emplace_back") or (kind, value) == (IDENT, "insert"):
                self.scan_vector_call(tokens, i, tracked)
            if (kind, value) != (PUNCT, "{"):
                continue
            end = matching(tokens, i)
            elements = [element_value(e) for e in split_elements(tokens, i, end)]
            if len(elements) == 2 and isinstance(elements[0], str) and (
                    elements[0] in self.variables):
                self.record_variable(elements[0])
            if prev == (PUNCT, ":"):
                continue  # for (const char* command : {"exec", "stop"}): words, not an argv
            argv = self.argv_of(elements)
            if argv is None:
                continue
            self.record_argv(argv)
            name = self.declared_name(tokens, i)
            if name:
                tracked[name] = list(argv)

    def argv_of(self, elements):
        """msb's argv in a brace list's elements, or None if the list is not one."""
        if BINARY in elements:
            at = elements.index(BINARY)
            self.record_assignments(elements[:at])
            return elements[at + 1:]
        if elements and self.is_argv_start(elements[0]):
            return elements
        return None

    @staticmethod
    def declared_name(tokens, brace):
        """NAME if the brace list at `brace` initializes a variable: "NAME = {" or "NAME{"."""
        j = brace - 1
        if j >= 0 and tokens[j] == (PUNCT, "="):
            j -= 1
        if j >= 1 and tokens[j][0] == IDENT and (tokens[j - 1][0] == IDENT or
                                                 tokens[j - 1] == (PUNCT, ">")):
            return tokens[j][1]
        return None

    def scan_vector_call(self, tokens, i, tracked):
        """NAME.push_back("x"), NAME.insert(NAME.end(), {"x", "y"}),
        NAME.insert(NAME.begin(), {"snapshot", "create"})."""
        if i < 2 or tokens[i - 1] != (PUNCT, ".") or tokens[i - 2][0] != IDENT:
            return
        if i + 1 >= len(tokens) or tokens[i + 1] != (PUNCT, "("):
            return
        name = tokens[i - 2][1]
        end = matching(tokens, i + 1)
        arguments = split_elements(tokens, i + 1, end)
        added = []
        for argument in arguments:
            if argument and argument[0] == (PUNCT, "{"):
                inner_end = matching(argument, 0)
                added += [element_value(e) for e in split_elements(argument, 0, inner_end)]
            elif len(argument) == 1 and argument[0][0] == STRING:
                added.append(argument[0][1])
        front = (tokens[i][1] == "insert" and arguments and
                 [t[1] for t in arguments[0][:3]] == [name, ".", "begin"])
        if front and added and self.is_argv_start(added[0]):
            tracked[name] = added + [None]  # the caller's words follow
        elif name in tracked and added:
            tracked[name] = tracked[name] + added
        else:
            return
        self.record_argv(tracked[name])

    # Shell -----------------------------------------------------------------------------------

    def scan_shell(self, text):
        text = re.sub(r"\\\n", " ", text)
        for line in text.splitlines():
            try:
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                lexer.commenters = "#"
                words = list(lexer)
            except ValueError:
                continue
            for at, word in enumerate(words):
                if word in ("msb", "$msb", "${msb}") or word.endswith("/msb"):
                    rest = []
                    for w in words[at + 1:]:
                        if w and set(w) <= SHELL_OPERATORS:
                            break
                        rest.append(None if "$" in w else w)
                    self.record_argv(rest)
                    self.record_assignments(words[:at])


# --- The check ------------------------------------------------------------------------------


def read_exceptions(path):
    """[(line number, entry words, comment)]."""
    entries = []
    if not os.path.exists(path):
        return entries
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            entry, _, comment = line.partition("#")
            if entry.strip():
                entries.append((number, entry.split(), comment.strip()))
    return entries


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: %s MSB_BINARY SOURCE_DIR" % sys.argv[0])
    msb, source = sys.argv[1], sys.argv[2]
    tests = os.path.join(source, "tests")
    commands, children, global_options, help_text = walk(msb)
    if not commands:
        # The help format changed: every check below would pass vacuously.
        sys.exit("failed: no commands found in %s --help" % msb)
    variables = sorted(set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", help_text)) |
                       set(man_environment(os.path.join(source, "man", "msb.1"))))
    # -h/--help is on every command: it counts once, as a global option.
    global_forms = {form for o in global_options for form in o.forms}
    for path in commands:
        commands[path] = [o for o in commands[path] if not set(o.forms) & global_forms]

    coverage = Coverage(commands, children, global_options, variables)
    sources = sorted(f for f in os.listdir(tests) if f.endswith((".cpp", ".h", ".sh")))
    for name in sources:
        with open(os.path.join(tests, name), encoding="utf-8") as f:
            text = f.read()
        if name.endswith(".sh"):
            coverage.scan_shell(text)
        else:
            coverage.scan_cpp(text)

    # Everything there is, as the exceptions file spells it.
    items = []  # (key words, description, covered)
    for option in global_options:
        items.append(((option.name,), "msb " + "/".join(option.forms),
                      option.name in coverage.covered_globals, option.forms))
    for path in sorted(commands):
        items.append((path, "msb " + " ".join(path), path in coverage.covered_commands, None))
        for option in commands[path]:
            items.append((path + (option.name,),
                          "msb %s %s" % (" ".join(path), "/".join(option.forms)),
                          (path, option.name) in coverage.covered_flags, option.forms))
    for variable in variables:
        items.append((("$" + variable,), "$" + variable,
                      variable in coverage.covered_variables, None))

    def key_of(words):
        """The item key an exceptions entry names, with any form of a flag."""
        for key, _, _, forms in items:
            if tuple(words) == key:
                return key
            if forms and tuple(words[:-1]) == key[:-1] and words[-1] in forms:
                return key
        return None

    failed = 0
    exempt = {}
    exceptions_file = os.path.join(tests, "cli_coverage_exceptions.txt")
    for number, words, comment in read_exceptions(exceptions_file):
        where = "%s:%d: %s" % (os.path.basename(exceptions_file), number, " ".join(words))
        key = key_of(words)
        if key is None:
            print("stale exception: %s: msb has no such command, flag or variable" % where)
            failed += 1
        elif not comment:
            print("bad exception: %s: needs a '#' comment saying why it is exempt" % where)
            failed += 1
        else:
            exempt[key] = where

    covered = exempted = 0
    for key, description, is_covered, _ in items:
        if is_covered:
            covered += 1
            print("tested: " + description)
            if key in exempt:
                print("stale exception: %s: tests exercise it" % exempt[key])
                failed += 1
        elif key in exempt:
            exempted += 1
            print("exempt: %s (%s)" % (description, exempt[key]))
        else:
            print("untested: " + ("msb " + " ".join(key) if not key[0].startswith("$") else key[0]))
            failed += 1
    print("%d of %d commands, flags and variables tested through the binary; %d exempt; "
          "%d problem%s" % (covered, len(items), exempted, failed, "" if failed == 1 else "s"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
