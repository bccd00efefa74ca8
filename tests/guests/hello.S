# Prints a line on COM1, then pulses the i8042 reset line: rvmm must exit with status 0.
.code64
.globl _start
_start:
    lea msg(%rip), %rbx
    call puts
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

# Writes the NUL-terminated string at %rbx to the UART's transmit register.
puts:
    mov $0x3f8, %dx
2:  mov (%rbx), %al
    test %al, %al
    jz 3f
    out %al, %dx
    inc %rbx
    jmp 2b
3:  ret

msg: .asciz "RVMM-TINY hello from a hand-written guest\n"
