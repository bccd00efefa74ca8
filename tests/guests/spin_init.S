# A Linux /init that never makes a system call and never ends: a guest that stays up but
# never answers (the container tests' silent agent).
.globl _start
_start:
    pause
    jmp _start
