# bash completion for msb                                            -*- shell-script -*-
#
# Install as /usr/share/bash-completion/completions/msb, or source it from ~/.bashrc.
#
# Commands are known by their path ("msb", "msb store", "msb store put"). To add a command, add
# its path to _msb_subcommands (under its parent), its options to _msb_options, and, if it takes
# arguments, a case to _msb_arguments. tests/check_docs.sh checks these tables against
# `msb --help`.

# The subcommands of a command path (none for a leaf).
_msb_subcommands() {
    case $1 in
        "msb") echo "create exec ls logs stop start pause resume rm run snapshot restore store image pull" ;;
        "msb snapshot") echo "create save-named ls inspect rm" ;;
        "msb store") echo "put get ls rm stats verify gc" ;;
        "msb image") echo "import ls rm" ;;
    esac
}

# The options of a command path. Global options are accepted after any command too, so they are
# offered everywhere; --version only where it makes sense, at the top.
_msb_options() {
    local global="--home -q --quiet -h --help"
    case $1 in
        "msb") echo "$global --version" ;;
        "msb create") echo "$global --kernel --image --initrd --disk --disk-size --cmdline --cpus --memory --max-cpus --max-memory --env" ;;
        "msb exec") echo "$global --env --workdir --user --timeout" ;;
        "msb logs") echo "$global -f --follow" ;;
        "msb stop") echo "$global --timeout" ;;
        "msb rm") echo "$global -f --force" ;;
        "msb run") echo "$global --name --kernel --image --initrd --disk --disk-size --cmdline --cpus --memory --max-cpus --max-memory --env --workdir --user --timeout" ;;
        "msb snapshot create") echo "$global --resume --json" ;;
        "msb snapshot save-named") echo "$global -f --force" ;;
        "msb snapshot inspect") echo "$global --json --verify" ;;
        "msb restore") echo "$global --name --fork --memory --cpus --env --json" ;;
        "msb store put") echo "$global -f --force" ;;
        "msb image import") echo "$global --tag --json" ;;
        "msb ls" | "msb snapshot ls" | "msb store ls" | "msb store stats") echo "$global --json" ;;
        "msb image ls" | "msb pull") echo "$global --json" ;;
        "msb store gc") echo "$global -n --dry-run" ;;
        *) echo "$global" ;;
    esac
}

# Existing names: the files under the store's names/ directory. Read directly rather than through
# `msb store ls` so that completion is instant, needs no msb on PATH and never takes the store lock.
# $1 is the --home given on the command line, if any.
_msb_names() {
    local home=${1:-${MSB_HOME:-$HOME/.msb}}
    # The word was typed, not expanded: expand a leading ~ the way the shell will.
    # shellcheck disable=SC2088  # the literal "~" is what is being looked for
    [[ $home == "~" || $home == "~/"* ]] && home=$HOME${home:1}
    local file
    for file in "$home"/store/names/*; do
        [[ -f $file ]] && printf '%s\n' "${file##*/}"
    done
}

# Snapshot names: the store's names, less msb's own ("sandbox.*", "image.*"). Whether a name is a snapshot's
# or a file's would take reading its manifest; offering both is cheap and harmless.
_msb_snapshot_names() {
    local name
    while IFS= read -r name; do
        [[ $name == sandbox.* || $name == image.* ]] || printf '%s\n' "$name"
    done < <(_msb_names "$1")
}

# Existing sandboxes: the folders under $home/sandboxes, read directly for the same reasons.
_msb_sandboxes() {
    local home=${1:-${MSB_HOME:-$HOME/.msb}}
    # shellcheck disable=SC2088  # the literal "~" is what is being looked for
    [[ $home == "~" || $home == "~/"* ]] && home=$HOME${home:1}
    local dir
    for dir in "$home"/sandboxes/*; do
        [[ -d $dir ]] && printf '%s\n' "${dir##*/}"
    done
}

# Completes file paths (bash-completion's _filedir when loaded: it handles quoting and ~).
_msb_files() {
    if declare -F _filedir >/dev/null; then
        _filedir "$@"
        return
    fi
    compopt -o filenames 2>/dev/null
    if [[ ${1-} == -d ]]; then
        mapfile -t COMPREPLY < <(compgen -d -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}

# Completes the Nth (from 1) positional argument of a leaf command: $1 the command path, $2 N.
# Uses $cur, $home, $force and $positionals from _msb.
_msb_arguments() {
    local names=()
    case "$1 $2" in
        "msb exec 1" | "msb logs 1" | "msb stop 1" | "msb start 1" | "msb pause 1" | \
            "msb resume 1" | "msb snapshot create 1")
            mapfile -t names < <(_msb_sandboxes "$home") ;;
        "msb rm "*)
            local name given
            while IFS= read -r name; do
                for given in "${positionals[@]}"; do
                    [[ $name == "$given" ]] && continue 2
                done
                names+=("$name")
            done < <(_msb_sandboxes "$home") ;;
        "msb store put 1")
            # A new name needs no completion; with --force the point is to replace one.
            [[ $force == 1 ]] && mapfile -t names < <(_msb_names "$home") ;;
        "msb store get 1" | "msb store rm "*)
            # rm takes several names: leave out those already given.
            local name given
            while IFS= read -r name; do
                for given in "${positionals[@]}"; do
                    [[ $name == "$given" ]] && continue 2
                done
                names+=("$name")
            done < <(_msb_names "$home") ;;
        "msb snapshot save-named 1" | "msb snapshot inspect 1" | "msb restore 1")
            # A handle is typed (or pasted); names are what can be completed.
            mapfile -t names < <(_msb_snapshot_names "$home") ;;
        "msb snapshot save-named 2")
            # A new name needs no completion; with --force the point is to replace one.
            [[ $force == 1 ]] && mapfile -t names < <(_msb_snapshot_names "$home") ;;
        "msb snapshot rm "*)
            local name given
            while IFS= read -r name; do
                for given in "${positionals[@]}"; do
                    [[ $name == "$given" ]] && continue 2
                done
                names+=("$name")
            done < <(_msb_snapshot_names "$home") ;;
        "msb store put 2" | "msb store get 2" | "msb image import 1")
            # An OCI image layout is a folder, a docker save tarball a file: offer both.
            _msb_files
            return ;;
    esac
    mapfile -t COMPREPLY < <(compgen -W "${names[*]}" -- "$cur")
}

_msb() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD - 1]-}
    COMPREPLY=()

    # --home takes a directory, as "--home DIR" or "--home=DIR" (which bash splits at "=").
    if [[ $prev == --home ]] ||
        [[ $prev == = && ${COMP_WORDS[COMP_CWORD - 2]-} == --home ]]; then
        _msb_files -d
        return
    fi
    # Options that take a file.
    # (--kernel also takes an installed kernel's name, which is typed.)
    if [[ $prev == --kernel || $prev == --initrd || $prev == --disk ]]; then
        _msb_files
        return
    fi
    if [[ $cur == --home=* ]]; then  # COMP_WORDBREAKS without "="
        cur=${cur#--home=}
        _msb_files -d
        return
    fi

    # Walk the words before the cursor: follow subcommands to the command path, and note the
    # options and positional arguments that matter for completing what comes next.
    local path="msb" home="" force=0 only_positionals=0 word i
    local positionals=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ $only_positionals == 0 ]]; then
            case $word in
                --) only_positionals=1; continue ;;
                --home)
                    # Skip its value, and the "=" of "--home=DIR".
                    [[ ${COMP_WORDS[i + 1]-} == = ]] && ((i++))
                    home=${COMP_WORDS[i + 1]-}
                    ((i++))
                    continue ;;
                --home=*) home=${word#--home=}; continue ;;
                # Options with a value: skip the value too.
                --kernel | --initrd | --disk | --disk-size | --cmdline | --cpus | --memory | \
                    --max-cpus | --max-memory | --env | --workdir | --timeout | --name | --fork | \
                    --image | --user | --tag)
                    ((i++))
                    continue ;;
                -f | --force) force=1; continue ;;
                -*) continue ;;
            esac
        fi
        if [[ ${#positionals[@]} == 0 && " $(_msb_subcommands "$path") " == *" $word "* ]]; then
            path+=" $word"
        else
            positionals+=("$word")
        fi
    done

    if [[ $cur == -* && $only_positionals == 0 ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_msb_options "$path")" -- "$cur")
        return
    fi
    local subcommands
    subcommands=$(_msb_subcommands "$path")
    if [[ -n $subcommands ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$subcommands" -- "$cur")
        return
    fi
    _msb_arguments "$path" $((${#positionals[@]} + 1))
}

complete -F _msb msb
