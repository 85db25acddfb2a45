"""`agentctl completion bash|zsh|fish`: scripts completing commands, flags and agent names.
Pure text, called by cli with the commands and flags read off its argparse parser. The
scripts list agent names from `<state-dir>/status/*.yaml` themselves (no Python per TAB)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SHELLS = ("bash", "zsh", "fish")
# values of flags that take one of a few words
VALUES = {"-o": "table wide json yaml", "--output": "table wide json yaml", "--for": "phase= condition= delete",
          "--log-format": "text json"}
DIR_FLAGS = ("--state-dir", "--manifests", "--base-dir")
FILE_FLAGS = ("--config",)


def script(shell: str, commands: Mapping[str, Sequence[str]], name_commands: Sequence[str]) -> str:
    """commands: command -> its flags; name_commands: the commands whose positional is an agent name."""
    if shell == "bash":
        return _bash(commands, name_commands)
    if shell == "zsh":
        return _zsh(commands, name_commands)
    if shell == "fish":
        return _fish(commands, name_commands)
    raise ValueError(f"unknown shell {shell!r} (one of {', '.join(SHELLS)})")


_BASH_NAMES = r'''_agentctl_names() {
  local dir=.agentctl i f
  for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
    case ${COMP_WORDS[i]} in
      --state-dir) dir=${COMP_WORDS[i + 1]} ;;
      --state-dir=*) dir=${COMP_WORDS[i]#--state-dir=} ;;
    esac
  done
  for f in "$dir"/status/*.yaml; do
    [[ -e $f ]] || continue
    f=${f##*/}
    printf '%s\n' "${f%.yaml}"
  done
}
'''


def _bash(commands: Mapping[str, Sequence[str]], name_commands: Sequence[str]) -> str:
    cases = "".join(f"    {cmd}) flags=\"{' '.join(flags)}\" ;;\n" for cmd, flags in commands.items())
    values = "".join(f"    {flag}) COMPREPLY=($(compgen -W \"{words}\" -- \"$cur\")); return ;;\n"
                     for flag, words in VALUES.items())
    return (
        "# agentctl bash completion. Load it with: source <(agentctl completion bash)\n"
        + _BASH_NAMES
        + "_agentctl() {\n"
        + "  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]} cmd=${COMP_WORDS[1]} flags=\n"
        + "  COMPREPLY=()\n"
        + f"  if ((COMP_CWORD == 1)); then COMPREPLY=($(compgen -W \"{' '.join(commands)}\" -- \"$cur\")); return; fi\n"
        + "  case $prev in\n"
        + f"    {'|'.join(DIR_FLAGS)}) COMPREPLY=($(compgen -d -- \"$cur\")); return ;;\n"
        + f"    {'|'.join(FILE_FLAGS)}) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n"
        + "    completion) COMPREPLY=($(compgen -W \"bash zsh fish\" -- \"$cur\")); return ;;\n"
        + values
        + "  esac\n"
        + "  case $cmd in\n" + cases + "  esac\n"
        + "  if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W \"$flags\" -- \"$cur\")); return; fi\n"
        + f"  case \" {' '.join(name_commands)} \" in\n"
        + "    *\" $cmd \"*) COMPREPLY=($(compgen -W \"$(_agentctl_names)\" -- \"$cur\")) ;;\n"
        + "  esac\n"
        + "}\n"
        + "complete -F _agentctl agentctl\n"
    )


def _zsh(commands: Mapping[str, Sequence[str]], name_commands: Sequence[str]) -> str:
    # zsh runs the bash function through bashcompinit: one implementation of the rules for both shells
    return ("#compdef agentctl\n# agentctl zsh completion. Load it with: source <(agentctl completion zsh)\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + _bash(commands, name_commands))


def _fish(commands: Mapping[str, Sequence[str]], name_commands: Sequence[str]) -> str:
    lines = [
        "# agentctl fish completion. Load it with: agentctl completion fish | source",
        "function __agentctl_names",
        "    set -l dir .agentctl",
        "    set -l words (commandline -opc)",
        "    for i in (seq (count $words))",
        "        if test \"$words[$i]\" = --state-dir; and test $i -lt (count $words)",
        "            set dir $words[(math $i + 1)]",
        "        end",
        "    end",
        "    for f in $dir/status/*.yaml",
        "        basename $f .yaml",
        "    end",
        "end",
        "complete -c agentctl -f",
        f"complete -c agentctl -n __fish_use_subcommand -a '{' '.join(commands)}'",
        f"complete -c agentctl -n '__fish_seen_subcommand_from {' '.join(name_commands)}' -a '(__agentctl_names)'",
        "complete -c agentctl -n '__fish_seen_subcommand_from completion' -a 'bash zsh fish'",
    ]
    for cmd, flags in commands.items():
        for flag in flags:
            opt = f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}"
            words = VALUES.get(flag)
            extra = f" -x -a '{words}'" if words else (" -r -F" if flag in DIR_FLAGS + FILE_FLAGS else "")
            lines.append(f"complete -c agentctl -n '__fish_seen_subcommand_from {cmd}' {opt}{extra}")
    return "\n".join(lines) + "\n"
