# fish completion for msb.
#
# Install as /usr/share/fish/vendor_completions.d/msb.fish or ~/.config/fish/completions/msb.fish.
#
# Commands are known by their path ("msb", "msb store", "msb store put"), which __fish_msb_parse
# works out from the command line. To add a command, add a line to __fish_msb_tree, its options
# with `-n "__fish_msb_using 'PATH'"`, and its arguments with __fish_msb_arg.
# tests/check_docs.sh checks the tree against `msb --help`.

# Every subcommand: parent path, name, description. The single list both offers subcommands and
# tells __fish_msb_parse which words are subcommands.
set -g __fish_msb_tree \
    'msb' create 'Create a sandbox and boot it' \
    'msb' exec 'Run a command in a sandbox' \
    'msb' ls 'List sandboxes with their state' \
    'msb' logs "Print a sandbox's console log" \
    'msb' stop 'Power a sandbox off' \
    'msb' start 'Boot a stopped sandbox again' \
    'msb' pause 'Pause a running sandbox (its vCPUs stop)' \
    'msb' resume 'Let a paused sandbox run again' \
    'msb' rm 'Remove sandboxes and everything in their folders' \
    'msb' run 'Create a sandbox, run one command in it, remove it' \
    'msb' snapshot 'Capture, name, list and remove snapshots' \
    'msb' restore 'Start sandboxes from a snapshot, without booting' \
    'msb' store 'Inspect and maintain the content-addressed store' \
    'msb' image 'Import, list and remove root file system images' \
    'msb' pull 'Download an image from a registry and import it' \
    'msb snapshot' create 'Pause a sandbox, capture its whole state, print the handle' \
    'msb snapshot' save-named 'Keep a snapshot under a name that outlives its sandbox' \
    'msb snapshot' ls 'List snapshots' \
    'msb snapshot' inspect 'Show a snapshot' \
    'msb snapshot' rm 'Remove snapshot names' \
    'msb store' put 'Store a file under a name (chunked, deduplicated)' \
    'msb store' get 'Write a file stored under a name' \
    'msb store' ls 'List the names in the store' \
    'msb store' rm 'Remove names (gc reclaims their space)' \
    'msb store' stats 'Show chunk counts, sizes, dedup and compression' \
    'msb store' verify 'Re-hash every chunk and check every reference' \
    'msb store' gc 'Delete what no name or running sandbox uses' \
    'msb image' import 'Import an OCI image layout or a docker save tarball' \
    'msb image' ls 'List images: tag, id, ext4 size, created, source' \
    'msb image' rm 'Remove image tags (gc reclaims what nothing uses)'

# Prints, one per line: the command path, the --home given (or an empty line), 1 if -f/--force
# was given (else 0), then the positional arguments before the cursor. This walks the tokens
# itself instead of using __fish_seen_subcommand_from, which would take a store name such as "ls",
# or the DIR of "--home store", for a subcommand, and cannot count positional arguments.
function __fish_msb_parse
    set -l path msb
    set -l home ''
    set -l force 0
    set -l positionals
    set -l only_positionals 0
    set -l tokens (commandline -opc)
    set -l i 2
    while test $i -le (count $tokens)
        set -l token $tokens[$i]
        set i (math $i + 1)
        if test $only_positionals = 0
            switch $token
                case --
                    set only_positionals 1
                    continue
                case --home
                    set home $tokens[$i]
                    set i (math $i + 1)
                    continue
                case '--home=*'
                    set home (string replace -- --home= '' $token)
                    continue
                case --kernel --initrd --disk --disk-size --cmdline --cpus --memory --max-cpus \
                    --max-memory --env --workdir --timeout --name --fork --image --user --tag
                    # An option with a value: skip the value too.
                    set i (math $i + 1)
                    continue
                case -f --force
                    set force 1
                    continue
                case '-*'
                    continue
            end
        end
        if test (count $positionals) -eq 0; and __fish_msb_is_subcommand "$path" $token
            set -a path $token
        else
            set -a positionals $token
        end
    end
    printf '%s\n' "$path" "$home" $force $positionals
end

function __fish_msb_is_subcommand --argument-names parent word
    for i in (seq 1 3 (count $__fish_msb_tree))
        set -l j (math $i + 1)
        if test "$__fish_msb_tree[$i]" = "$parent" -a "$__fish_msb_tree[$j]" = "$word"
            return 0
        end
    end
    return 1
end

# True if the command path is one of the arguments.
function __fish_msb_using
    set -l state (__fish_msb_parse)
    contains -- $state[1] $argv
end

# True if the command path is $argv[1] and the cursor is on its positional argument $argv[2]
# (from 1). A command's subcommand is its first positional argument.
function __fish_msb_arg --argument-names path n
    set -l state (__fish_msb_parse)
    test "$state[1]" = "$path"; and test (math (count $state) - 3 + 1) -eq $n
end

# True if -f or --force was given.
function __fish_msb_forced
    set -l state (__fish_msb_parse)
    test "$state[3]" = 1
end

# Existing names: the files under the store's names/ directory, less the positional arguments
# already given. Read directly rather than through `msb store ls`, so that completion is instant,
# needs no msb on PATH and never takes the store lock.
function __fish_msb_names
    set -l state (__fish_msb_parse)
    set -l home $state[2]
    test -n "$home"; or set home $MSB_HOME
    test -n "$home"; or set home ~/.msb
    # The word was typed, not expanded: expand a leading ~ as the shell will.
    set home (string replace -r -- '^~(?=/|$)' $HOME $home)
    for file in $home/store/names/*
        set -l name (string replace -r -- '.*/' '' $file)
        if test -f $file; and not contains -- $name $state[4..-1]
            echo $name
        end
    end
end

# Snapshot names: the store's names less msb's own (sandbox.*, image.*). Telling a snapshot's name from a
# file's would take reading its manifest; offering both is cheap and harmless. A handle is typed.
function __fish_msb_snapshot_names
    __fish_msb_names | string match -v -r -- '^(sandbox|image)\.'
end

# Existing sandboxes: the folders under sandboxes/, less the positional arguments already given.
function __fish_msb_sandboxes
    set -l state (__fish_msb_parse)
    set -l home $state[2]
    test -n "$home"; or set home $MSB_HOME
    test -n "$home"; or set home ~/.msb
    set home (string replace -r -- '^~(?=/|$)' $HOME $home)
    for dir in $home/sandboxes/*
        set -l name (string replace -r -- '.*/' '' $dir)
        if test -d $dir; and not contains -- $name $state[4..-1]
            echo $name
        end
    end
end

# No file names unless a FILE argument is expected.
complete -c msb -f

# Subcommands.
for i in (seq 1 3 (count $__fish_msb_tree))
    complete -c msb -n "__fish_msb_arg '$__fish_msb_tree[$i]' 1" \
        -a $__fish_msb_tree[(math $i + 1)] -d $__fish_msb_tree[(math $i + 2)]
end

# Global options: accepted after any command too.
complete -c msb -l home -x -a '(__fish_complete_directories)' \
    -d 'State directory (default: $MSB_HOME, else ~/.msb)'
complete -c msb -s q -l quiet -d 'Print no progress and no extra messages'
complete -c msb -s h -l help -d 'Print help and exit'
complete -c msb -n "__fish_msb_using msb" -l version -d 'Print the version and exit'

# Options and arguments of each command.
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l kernel -r -F \
    -d 'Kernel: testguest, an installed kernel (debian-cloud) or a file'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l image -x \
    -d 'Root image NAME:TAG for a Linux kernel (default busybox:latest)'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l initrd -r -F -d 'Initial ramdisk'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l disk -r -F -d 'Base disk image'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l disk-size -x \
    -d 'Size of the blank disk in MiB'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l cmdline -x -d 'Kernel command line'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l cpus -x -d vCPUs
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l memory -x -d 'Memory in MiB'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l max-cpus -x \
    -d 'vCPUs the VM is built for'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run'" -l max-memory -x \
    -d 'Memory the VM is built for'
complete -c msb -n "__fish_msb_using 'msb create' 'msb run' 'msb exec'" -l env -x -d KEY=VALUE
complete -c msb -n "__fish_msb_using 'msb exec' 'msb run'" -l workdir -x -d 'Working directory'
complete -c msb -n "__fish_msb_using 'msb exec' 'msb run'" -l user -x \
    -d 'Run as USER, UID, USER:GROUP or UID:GID'
complete -c msb -n "__fish_msb_using 'msb exec' 'msb run' 'msb stop'" -l timeout -x -d Seconds
complete -c msb -n "__fish_msb_using 'msb run'" -l name -x -d 'Name of the sandbox'
complete -c msb -n "__fish_msb_arg 'msb exec' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb ls'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_arg 'msb logs' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb logs'" -s f -l follow -d 'Keep printing while it runs'
complete -c msb -n "__fish_msb_arg 'msb stop' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_arg 'msb start' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb rm'" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb rm'" -s f -l force -d 'Remove running sandboxes too'
complete -c msb -n "__fish_msb_using 'msb store put'" -s f -l force \
    -d 'Replace the name if it exists'
complete -c msb -n "__fish_msb_arg 'msb store put' 1; and __fish_msb_forced" \
    -a '(__fish_msb_names)' -d Name
complete -c msb -n "__fish_msb_arg 'msb store put' 2" -F
complete -c msb -n "__fish_msb_arg 'msb store get' 1" -a '(__fish_msb_names)' -d Name
complete -c msb -n "__fish_msb_arg 'msb store get' 2" -F
complete -c msb -n "__fish_msb_using 'msb store ls'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_using 'msb store rm'" -a '(__fish_msb_names)' -d Name
complete -c msb -n "__fish_msb_using 'msb store stats'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_using 'msb store gc'" -s n -l dry-run \
    -d 'Only report what would be removed'
complete -c msb -n "__fish_msb_arg 'msb pause' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_arg 'msb resume' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb snapshot create'" -l resume \
    -d 'Let the sandbox run again once it is captured'
complete -c msb -n "__fish_msb_using 'msb snapshot create'" -l json \
    -d 'Print timings and sizes as JSON'
complete -c msb -n "__fish_msb_arg 'msb snapshot create' 1" -a '(__fish_msb_sandboxes)' -d Sandbox
complete -c msb -n "__fish_msb_using 'msb snapshot save-named'" -s f -l force \
    -d 'Replace the name if it exists'
complete -c msb -n "__fish_msb_arg 'msb snapshot save-named' 1" \
    -a '(__fish_msb_snapshot_names)' -d Snapshot
complete -c msb -n "__fish_msb_arg 'msb snapshot save-named' 2; and __fish_msb_forced" \
    -a '(__fish_msb_snapshot_names)' -d Name
complete -c msb -n "__fish_msb_using 'msb snapshot ls'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_using 'msb snapshot inspect'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_using 'msb snapshot inspect'" -l verify \
    -d 'Re-read and check every chunk it references'
complete -c msb -n "__fish_msb_arg 'msb snapshot inspect' 1" \
    -a '(__fish_msb_snapshot_names)' -d Snapshot
complete -c msb -n "__fish_msb_using 'msb snapshot rm'" -a '(__fish_msb_snapshot_names)' -d Snapshot
complete -c msb -n "__fish_msb_using 'msb restore'" -l name -x \
    -d 'Name of the new sandbox (with --fork, their prefix)'
complete -c msb -n "__fish_msb_using 'msb restore'" -l fork -x \
    -d 'Start K sandboxes, NAME-0 .. NAME-(K-1), at once'
complete -c msb -n "__fish_msb_using 'msb restore'" -l memory -x \
    -d "Memory to grant in MiB (within the snapshot's --max-memory)"
complete -c msb -n "__fish_msb_using 'msb restore'" -l cpus -x \
    -d "vCPUs to have online (within the snapshot's --max-cpus)"
complete -c msb -n "__fish_msb_using 'msb restore'" -l env -x \
    -d "KEY=VALUE over the snapshot's environment"
complete -c msb -n "__fish_msb_using 'msb restore'" -l json \
    -d 'Print the sandboxes and timings as JSON'
complete -c msb -n "__fish_msb_arg 'msb restore' 1" -a '(__fish_msb_snapshot_names)' -d Snapshot
# Image tags are stored under hashed names (image.<hash>), so they are typed: msb image ls lists them.
complete -c msb -n "__fish_msb_using 'msb image import'" -l tag -x -d 'NAME[:TAG] to keep it under'
complete -c msb -n "__fish_msb_using 'msb image import'" -l json -d 'Print the image as JSON'
complete -c msb -n "__fish_msb_arg 'msb image import' 1" -F
complete -c msb -n "__fish_msb_using 'msb image ls'" -l json -d 'Print JSON'
complete -c msb -n "__fish_msb_using 'msb pull'" -l json -d 'Print the image as JSON'
