# Prints "RVMM-TINY tick" again and again, about five times a second (a busy wait of 500M TSC
# cycles), and never ends: the API socket test's guest, whose output stops while the VM is
# paused.
.code64
.globl _start
_start:
    cli
1:  lea msg(%rip), %rbx
    mov $0x3f8, %dx
2:  mov (%rbx), %al
    test %al, %al
    jz 3f
    out %al, %dx
    inc %rbx
    jmp 2b
3:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rsi
    add $500000000, %rsi
4:  pause
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    cmp %rsi, %rax
    jb 4b
    jmp 1b
msg: .asciz "RVMM-TINY tick\n"
