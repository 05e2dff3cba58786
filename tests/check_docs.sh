#!/usr/bin/env bash
# Checks that the man page and the shell completions cover every command and option that msb's
# --help shows, so that a new command or flag cannot ship undocumented. Run by CTest:
#
#   tests/check_docs.sh MSB_BINARY SOURCE_DIR
#
# Commands are found by walking the "Subcommands:" sections of `msb --help`, `msb store --help`,
# and so on; options come from the "Options:" sections. For each command path ("store put"):
#   man page  a .TP entry whose tag line starts with the full command ("msb store put"), with the
#             command's options inside that entry;
#   bash      the subcommand as a word on a line that names its parent's path ("msb store"), as
#             the tables in msb.bash do; the command's options on a line naming its own path;
#   zsh       the subcommand as a "name:description" item in its parent's function (_msb_store
#             for "msb store"); the command's options in its own function (_msb_store_put);
#   fish      on a line naming the parent's path, the subcommand right after that quoted path
#             (the tree in msb.fish) or in an -a value; the command's options, spelled the fish
#             way (-l force, -s f), on a line naming its own path.
# The subcommand rules are that precise so that a description mentioning the word ("Remove
# names (gc reclaims their space)") does not count. Global options (those of `msb --help`) only
# have to appear somewhere in each file, and each environment variable the help mentions needs
# an entry under ENVIRONMENT. Comments do not count. The files are also checked for syntax, with
# each shell that is installed, and the man page for groff warnings.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 MSB_BINARY SOURCE_DIR" >&2
    exit 2
fi
msb=$1
src=$2
man_page=$src/man/msb.1
bash_completion=$src/completions/msb.bash
zsh_completion=$src/completions/_msb
fish_completion=$src/completions/msb.fish

passed=0
failed=0
pass() {
    passed=$((passed + 1))
    echo "ok: $*"
}
# fail [-r] DESCRIPTION: something is missing, or with -r, a command that should run cleanly failed.
fail() {
    local prefix=missing
    [[ $1 == -r ]] && prefix=failed && shift
    failed=$((failed + 1))
    echo "$prefix: $*"
}
# check [-r] DESCRIPTION COMMAND...: runs the command; passes if it succeeds (see fail for -r).
check() {
    local flag=()
    [[ $1 == -r ]] && flag=(-r) && shift
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "${flag[@]}" "$what"; fi
}
# Prints the summary and exits, failing if anything was missing.
finish() {
    echo "$passed passed, $failed failed"
    [[ $failed -eq 0 ]]
    exit
}

# --- What --help says ---------------------------------------------------------------------------

# The names in section $1 ("Subcommands:" or "Options:") of the help text on stdin. CLI11 puts
# each name at an indent of exactly two spaces; wrapped descriptions are indented further and a
# section ends at the next unindented line. Options print one name per form ("-f", "--force").
help_section() {
    awk -v header="$1" '
        $0 == header      { inside = 1; next }
        /^[^ \t]/         { inside = 0 }
        inside && /^  [^ ]/ {
            if (header != "Options:") { print $1; next }
            n = split($1, forms, ",")
            for (i = 1; i <= n; i++) if (forms[i] ~ /^-/) print forms[i]
        }'
}

commands=()            # every command path below msb: "store", "store put", ...
declare -A options_of  # "msb", "msb store", ... -> the options, space-separated (bash allows no
                       # empty key, so the keys are full commands)
help_text=""           # all help output, for the environment variables it mentions

# Records the options of command path $1 and, recursively, its subcommands.
walk() {
    local path=$1 help sub
    # $path is split on purpose: "store put" is two arguments.
    # shellcheck disable=SC2086
    if ! help=$("$msb" $path --help); then
        fail -r "$msb${path:+ $path} --help"
        return
    fi
    help_text+=$help$'\n'
    options_of["msb${path:+ $path}"]=$(help_section Options: <<<"$help" | tr '\n' ' ')
    for sub in $(help_section Subcommands: <<<"$help"); do
        commands+=("${path:+$path }$sub")
        walk "${path:+$path }$sub"
    done
}
walk ""
# An empty list would make every check below pass vacuously, e.g. if the help format changed.
check "commands in $msb --help" test ${#commands[@]} -gt 0
for file in "$man_page" "$bash_completion" "$zsh_completion" "$fish_completion"; do
    check "file $file" test -f "$file"
done
# Without those, the checks below would only pile up noise.
[[ $failed -eq 0 ]] || finish
echo "commands: ${commands[*]}"
echo "global options: ${options_of[msb]}"

# --- Matching ----------------------------------------------------------------------------------

# $1 with the characters special in an extended regex escaped.
escape_re() {
    sed 's/[][\.*^$+?(){}|/]/\\&/g' <<<"$1"
}

# An extended regex that matches $1 as a whole word: not inside a longer name or option.
word_re() {
    echo "(^|[^[:alnum:]_-])$(escape_re "$1")([^[:alnum:]_-]|\$)"
}

# A regex for command path $1 ("msb store") named as a whole, as the completions' tables and
# conditions name them (quoted, or as a case pattern): not the start of "msb store put".
# shellcheck disable=SC2317  # called from in_context only
path_re() {
    echo "(^|[^[:alnum:]_-])$(escape_re "$1")([^[:alnum:][:space:]_-]|\$)"
}

# How file kind $1 offers subcommand $2, such that a description mentioning the word ("Remove
# names (gc reclaims their space)") does not count:
#   bash  as a word: its tables list subcommands without descriptions;
#   zsh   as a "name:description" item;
#   fish  right after its parent's quoted path in a tree line ('msb store' put 'Store...'), or in
#         an -a/--arguments value.
subcommand_re() {
    local kind=$1 word
    word=$(escape_re "$2")
    case $kind in
        bash) word_re "$2" ;;
        zsh) echo "(^|[[:space:]'\"(])$word:" ;;
        fish)
            local after_path="['\"][[:space:]]+$word([[:space:]]|\$)"
            local in_arguments="(-a|--arguments)[[:space:]=]+['\"]?"
            in_arguments+="([^'\"]*[[:space:]])?$word([[:space:]'\"]|\$)"
            echo "$after_path|$in_arguments"
            ;;
    esac
}

# How file kind $1 spells option $2: fish declares options as `-l force` and `-s f` rather than
# writing them out.
option_re() {
    local kind=$1 option=$2 declaration
    if [[ $kind != fish ]]; then
        word_re "$option"
        return
    fi
    if [[ $option == --* ]]; then
        declaration="(-l|--long-option)[[:space:]=]+['\"]?${option#--}"
    else
        declaration="(-s|--short-option)[[:space:]=]+['\"]?${option#-}"
    fi
    echo "(^|[[:space:]])$declaration(['\"]|[[:space:]]|\$)"
}

# The lines of file $1 that are not comments.
code_lines() {
    grep -v '^[[:space:]]*#' "$1" || true
}

# Whether file $2 of kind $1 has regex $4 in the place that belongs to command path $3 ("msb",
# "msb store"): in zsh the command's function (_msb_store), elsewhere a line that names the path.
# shellcheck disable=SC2317  # called through check, which shellcheck does not follow
in_context() {
    local kind=$1 file=$2 path=$3 re=$4
    if [[ $kind == zsh ]]; then
        local function=_${path// /_}
        code_lines "$file" |
            awk -v start="^(function )?$function( *\\\\(\\\\))? *[{(]?\$" '
                $0 ~ start { inside = 1; next }
                /^}/      { inside = 0 }
                inside' |
            grep -Eq -- "$re"
    else
        code_lines "$file" | grep -E -- "$(path_re "$path")" | grep -Eq -- "$re"
    fi
}

# The man page source without comments, and with the roff escapes that can sit inside words
# undone: font changes (\fB, \f(BI, \f[B]), \- for a hyphen, the zero-width \& and \%, and
# unbreakable spaces.
man_text() {
    sed -e '/^[.'"'"']*\\"/d' \
        -e 's/\\f\[[^]]*\]//g' -e 's/\\f([A-Za-z][A-Za-z]//g' -e 's/\\f[A-Za-z1-4]//g' \
        -e 's/\\-/-/g' -e 's/\\[&%]//g' -e 's/\\[~ ]/ /g' "$man_page"
}

# The man page's command entries as "PATH<TAB>TEXT" lines, TEXT being the entry's lines joined
# (from its tag to the next entry, .SS or .SH). A .TP tag line, its macro and quotes dropped,
# belongs to the longest command path it starts with.
man_entries() {
    man_text | awk -v commands="$(printf '%s\n' "${commands[@]}")" '
        BEGIN { n = split(commands, list, "\n") }
        function command_of(tag,    i, best) {
            sub(/^\.[A-Za-z]+[ \t]+/, "", tag)
            gsub(/"/, "", tag)
            gsub(/[ \t]+/, " ", tag)
            best = ""
            for (i = 1; i <= n; i++) {
                if ((tag == "msb " list[i] || index(tag, "msb " list[i] " ") == 1) &&
                    length(list[i]) > length(best)) best = list[i]
            }
            return best
        }
        function flush() { if (current != "") print current "\t" text; current = "" }
        after_tp {
            after_tp = 0
            c = command_of($0)
            if (c != "") { flush(); current = c; text = "" }
        }
        /^\.TP/ { after_tp = 1 }
        /^\.S[HS]/ { flush() }
        current != "" { text = text " " $0 }
        END { flush() }'
}

# --- Syntax -------------------------------------------------------------------------------------

check -r "bash -n $bash_completion" bash -n "$bash_completion"
for shell in zsh fish; do
    file=$zsh_completion
    [[ $shell == fish ]] && file=$fish_completion
    if command -v "$shell" >/dev/null; then
        check -r "$shell -n $file" "$shell" -n "$file"
    else
        echo "note: $shell is not installed; not checking $file's syntax"
    fi
done
if command -v groff >/dev/null; then
    # Warnings go to stderr: the page is clean if there are none.
    check -r "groff -ww finds no problem in $man_page" \
        test -z "$(groff -man -Tutf8 -ww -z "$man_page" 2>&1)"
else
    echo "note: groff is not installed; not checking that $man_page renders cleanly"
fi

# --- Commands -----------------------------------------------------------------------------------

entries=$(man_entries)
for command in "${commands[@]}"; do
    parent=${command% *}
    [[ $parent == "$command" ]] && parent=""
    leaf=${command##* }
    check "man page: an entry for msb $command" \
        grep -q "^$(escape_re "$command")"$'\t' <<<"$entries"
    for kind in bash zsh fish; do
        file_var=${kind}_completion
        check "$kind completion: $leaf under msb${parent:+ $parent}" \
            in_context "$kind" "${!file_var}" "msb${parent:+ $parent}" \
            "$(subcommand_re "$kind" "$leaf")"
    done
done

# --- Options ------------------------------------------------------------------------------------

man_source=$(man_text)
for option in ${options_of[msb]}; do
    check "man page: global option $option" grep -Eq -- "$(word_re "$option")" <<<"$man_source"
    for kind in bash zsh fish; do
        file_var=${kind}_completion
        check "$kind completion: global option $option" \
            grep -Eq -- "$(option_re "$kind" "$option")" <(code_lines "${!file_var}")
    done
done

for command in "${commands[@]}"; do
    for option in ${options_of["msb $command"]}; do
        # -h/--help is on every command and documented once, with the global options.
        [[ " ${options_of[msb]} " == *" $option "* ]] && continue
        entry=$(awk -F'\t' -v c="$command" '$1 == c { print $2 }' <<<"$entries")
        check "man page: $option in the entry for msb $command" \
            grep -Eq -- "$(word_re "$option")" <<<"$entry"
        for kind in bash zsh fish; do
            file_var=${kind}_completion
            check "$kind completion: $option for msb $command" \
                in_context "$kind" "${!file_var}" "msb $command" "$(option_re "$kind" "$option")"
        done
    done
done

# --- Environment --------------------------------------------------------------------------------

# Variables the help text mentions ("$MSB_HOME") must have an entry (a .TP tag) under ENVIRONMENT;
# a mention in passing ("The store is $MSB_HOME/store") does not count.
environment_tags=$(awk '
    /^\.SH/ { inside = ($0 ~ /ENVIRONMENT/); next }
    inside && after_tp { print; after_tp = 0 }
    inside && /^\.TP/ { after_tp = 1 }' <<<"$man_source")
for variable in $(grep -Eo '\$[A-Z_][A-Z0-9_]*' <<<"$help_text" | sort -u | tr -d '$'); do
    check "man page: $variable under ENVIRONMENT" \
        grep -Eq -- "$(word_re "$variable")" <<<"$environment_tags"
done

finish
