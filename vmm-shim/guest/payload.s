# vmm-shim's payload guest: a tiny 64-bit program that exercises the
# shim's devices and the guest state service (docs/vmm-shim.md). It is
# assembled and linked to a flat binary by build.rs and loaded at 1 MiB.
#
# Boot protocol (set up by the shim, see src/boot.rs):
#   long mode, paging on (identity map of the first 4 GiB, 2 MiB pages),
#   interrupts off, SSE enabled (but unused: this host's software KVM
#   does not emulate SSE instructions); rip = LOAD + 0 on vCPU 0 and LOAD + 8 on the
#   others; rdi = vCPU index; rsi = boot parameters (BOOT_PARAMS);
#   rsp = the top of the vCPU's stack.
#
# Modes (boot parameter `mode`):
#   1 selftest  count, write numbered blocks, save with app data, go on,
#               ask for one more vCPU, restore, then check memory, registers,
#               disk, app data and the new vCPU
#   2 writer    write numbered blocks forever, logging each in memory; after
#               a restore event check that disk and memory agree
#   3 badmac    wrong, replayed and stale-epoch requests are refused
#   4 hwcheck   save, then after a restore onto new hardware check the new
#               memory and that the added vCPUs came up
#   5 identity  save; after resuming as a clone check that the identity and
#               generation changed
#   6 dirty     write one word in each of `arg` pages, over and over
#   7 migrate   the writer, which after 500 blocks asks for its own
#               migration (target: the VM's policy) with app data; on the
#               new host the migrated event must carry that app data, then
#               the resumed event checks disk against memory as the writer
#
# Every result goes to the serial port (0x3f8) as a line of text; the end
# of a test mode is an OUT to the exit port (0 = every check held).

        .intel_syntax noprefix
        .code64

        .equ LOAD,          0x100000
        .equ BOOT_PARAMS,   0x2000
        .equ SERIAL,        0x3f8
        .equ PORT_A,        0x5a0
        .equ PORT_B,        0x5a4
        .equ PORT_BLK,      0x5b0
        .equ PORT_EXIT,     0x5f0

        # boot parameters
        .equ BP_MODE,       0x04
        .equ BP_MEMORY,     0x08
        .equ BP_VCPUS,      0x10
        .equ BP_ARG,        0x14
        .equ BP_KEY,        0x18
        .equ BP_EPOCH,      0x28
        .equ BP_DISKS,      0x38

        # request (port A)
        .equ RQ_MAGIC,      0x5152474c          # "LGRQ"
        .equ RQ_OP,         0x06
        .equ RQ_EPOCH,      0x08
        .equ RQ_SEQ,        0x10
        .equ RQ_NAME_LEN,   0x18
        .equ RQ_DATA_LEN,   0x1c
        .equ RQ_ARG0,       0x20
        .equ RQ_ARG1,       0x28
        .equ RQ_NAME,       0x30
        .equ RQ_DATA,       0x70
        .equ OP_SAVE,       1
        .equ OP_LIST,       2
        .equ OP_RESTORE,    3
        .equ OP_DELETE,     4
        .equ OP_RECONFIG,   5
        .equ OP_INFO,       6
        .equ OP_MIGRATE,    7

        # event (port B)
        .equ EV_KIND,       0x06
        .equ EV_ID,         0x08
        .equ EV_STATUS,     0x0c
        .equ EV_EPOCH,      0x10
        .equ EV_FLAGS,      0x18
        .equ EV_DATA_LEN,   0x1c
        .equ EV_TEXT_LEN,   0x20
        .equ EV_TEXT,       0x28
        .equ K_SAVED,       1
        .equ K_LISTED,      2
        .equ K_RESTORED,    3
        .equ K_DELETED,     4
        .equ K_RECONFIGURED, 5
        .equ K_INFO,        6
        .equ K_ERROR,       7
        .equ K_RESUMED,     8
        .equ K_HARDWARE,    9
        .equ K_GENERATION,  10
        .equ K_MIGRATED,    11
        .equ F_AFTER_RESTORE, 1

        # block device request descriptor
        .equ BLK_READ,      0
        .equ BLK_WRITE,     1
        .equ BLK_FLUSH,     2

        # memory the payload uses beyond its image
        .equ PATTERN,       0x300000            # 64 KiB checked across save/restore
        .equ PATTERN_QW,    8192
        .equ DIRTY_BASE,    0x400000

        .section .text
        .globl _start
_start:
        jmp     bsp_entry
        .balign 8
        jmp     ap_entry
        .balign 8
        .ascii  "LGPAYLD1"

# ---------------------------------------------------------------------------
ap_entry:
        # Mark this vCPU alive, then halt with interrupts off for good.
        lea     rax, [rip + ap_alive]
        lock inc qword ptr [rax + rdi*8]
1:      hlt
        jmp     1b

# ---------------------------------------------------------------------------
bsp_entry:
        mov     [rip + boot_params], rsi
        mov     rax, [rsi + BP_EPOCH]
        mov     [rip + cur_epoch], rax
        lea     rsi, [rip + msg_hello]
        call    puts
        mov     rsi, [rip + boot_params]
        mov     eax, [rsi + BP_MODE]
        cmp     eax, 1
        je      mode_selftest
        cmp     eax, 2
        je      mode_writer
        cmp     eax, 3
        je      mode_badmac
        cmp     eax, 4
        je      mode_hwcheck
        cmp     eax, 5
        je      mode_identity
        cmp     eax, 6
        je      mode_dirty
        cmp     eax, 7
        je      mode_migrate
        mov     eax, 90
        jmp     fail

# ===========================================================================
# selftest
# ===========================================================================
mode_selftest:
        # 1. count
        xor     eax, eax
1:      inc     rax
        cmp     rax, 1000
        jb      1b
        mov     [rip + counter], rax

        # 2. numbered blocks 0..7, each stamped with its number and the counter
        xor     ebx, ebx
2:      mov     rdi, rbx
        mov     rsi, [rip + counter]
        call    stamp_block
        mov     edi, BLK_WRITE
        mov     rsi, rbx
        call    blk_one
        inc     ebx
        cmp     ebx, 8
        jb      2b
        mov     edi, BLK_FLUSH
        xor     esi, esi
        call    blk_one
        # and block 0 of the second disk, if the VM has one
        mov     rsi, [rip + boot_params]
        cmp     dword ptr [rsi + BP_DISKS], 2
        jb      7f
        mov     dword ptr [rip + blk_disk], 1
        mov     edi, 100
        mov     rsi, [rip + counter]
        call    stamp_block
        mov     edi, BLK_WRITE
        xor     esi, esi
        call    blk_one
        mov     dword ptr [rip + blk_disk], 0
7:

        # 3. a memory pattern derived from the counter
        mov     rdi, PATTERN
        mov     rax, [rip + counter]
        mov     rdx, 0x9e3779b97f4a7c15
        mov     ecx, PATTERN_QW
3:      imul    rax, rdx
        add     rax, rcx
        mov     [rdi], rax
        add     rdi, 8
        dec     ecx
        jnz     3b

        # 4. info: remember identity and generation
        call    do_info

        # 5. the state at the save point, in registers and memory
        mov     rsi, PATTERN
        mov     ecx, PATTERN_QW
        call    checksum
        mov     r12, rax
        mov     [rip + saved_sum], rax
        call    disk_sum
        mov     r15, rax
        mov     [rip + saved_disk], rax
        mov     r13, [rip + counter]
        mov     r14, 0x5eedc0de5eedc0de
        mov     rbp, r14
        not     rbp

        # 6. save "selftest" with app data
        lea     rsi, [rip + name_selftest]
        lea     rdx, [rip + data_save]
        mov     ecx, OP_SAVE
        call    request_named
        mov     [rip + save_id], eax
        mov     edi, K_SAVED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     st_fail_save
        mov     rbx, [rip + ev_ptr]
        test    dword ptr [rbx + EV_FLAGS], F_AFTER_RESTORE
        jnz     st_restored

        # --- the guest that goes on after the save --------------------------
        lea     rsi, [rip + msg_saved]
        call    puts
        lea     rsi, [rip + data_save]
        call    check_ev_data
        # list shows it
        call    do_list
        lea     rsi, [rip + name_selftest]
        call    list_has
        test    eax, eax
        jz      st_fail_list
        # reconfigure to one more vCPU: applied at the restore below
        mov     rsi, [rip + boot_params]
        mov     rax, [rsi + BP_MEMORY]
        mov     [rip + req_buf + RQ_ARG0], rax
        mov     eax, [rsi + BP_VCPUS]
        inc     eax
        mov     [rip + req_buf + RQ_ARG1], rax
        xor     esi, esi
        xor     edx, edx
        mov     ecx, OP_RECONFIG
        call    request_args
        mov     edi, K_RECONFIGURED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     st_fail_reconf
        # change everything the restore must undo
        mov     rax, [rip + counter]
        add     rax, 5000
        mov     [rip + counter], rax
        xor     ebx, ebx
4:      mov     rdi, rbx
        mov     rsi, 0xdeadbeef
        call    stamp_block
        mov     edi, BLK_WRITE
        mov     rsi, rbx
        call    blk_one
        inc     ebx
        cmp     ebx, 8
        jb      4b
        mov     rsi, [rip + boot_params]
        cmp     dword ptr [rsi + BP_DISKS], 2
        jb      8f
        mov     dword ptr [rip + blk_disk], 1
        mov     edi, 100
        mov     rsi, 0xdeadbeef
        call    stamp_block
        mov     edi, BLK_WRITE
        xor     esi, esi
        call    blk_one
        mov     dword ptr [rip + blk_disk], 0
8:      mov     rdi, PATTERN
        mov     ecx, PATTERN_QW
        mov     rax, 0x1111111111111111
        rep stosq
        xor     r12, r12
        xor     r13, r13
        xor     r14, r14
        xor     r15, r15
        xor     ebp, ebp
        # ask for the restore, with app data for the guest that exists then
        lea     rsi, [rip + name_selftest]
        lea     rdx, [rip + data_restore]
        mov     ecx, OP_RESTORE
        call    request_named
        mov     edi, K_RESTORED
        mov     esi, eax
        call    wait_event
        # A restore replaces this guest; reaching here means it did not.
        mov     eax, 20
        jmp     fail

        # --- the guest restored to the save point -------------------------------
st_restored:
        lea     rsi, [rip + msg_restored]
        call    puts
        # the save's own app data came with its completion
        lea     rsi, [rip + data_save]
        call    check_ev_data
        test    eax, eax
        jnz     st_fail_data
        # registers are those of the save point
        mov     rax, 0x5eedc0de5eedc0de
        cmp     r14, rax
        jne     st_fail_regs
        mov     rax, rbp
        not     rax
        cmp     rax, r14
        jne     st_fail_regs
        cmp     r13, [rip + counter]
        jne     st_fail_counter
        cmp     r13, 1000
        jne     st_fail_counter
        # memory
        mov     rsi, PATTERN
        mov     ecx, PATTERN_QW
        call    checksum
        cmp     rax, r12
        jne     st_fail_memory
        cmp     rax, [rip + saved_sum]
        jne     st_fail_memory
        # disk
        call    disk_sum
        cmp     rax, r15
        jne     st_fail_disk
        # the restore's app data, carried across the state change
        mov     edi, K_RESTORED
        xor     esi, esi
        call    wait_event
        test    eax, eax
        jnz     st_fail_restore_ev
        lea     rsi, [rip + data_restore]
        call    check_ev_data
        test    eax, eax
        jnz     st_fail_data
        # the reconfiguration took effect: one more vCPU, and it runs
        mov     edi, K_HARDWARE
        xor     esi, esi
        call    wait_event
        mov     rbx, [rip + ev_ptr]
        mov     ecx, [rbx + EV_TEXT_LEN]
        lea     rsi, [rbx + EV_TEXT + rcx]
        mov     rdx, [rip + boot_params]
        mov     eax, [rdx + BP_VCPUS]
        mov     ecx, eax
        inc     eax
        cmp     eax, [rsi + 20]
        jne     st_fail_reconf
        mov     edx, 500000
        lea     rax, [rip + ap_alive]
5:      cmp     qword ptr [rax + rcx*8], 0
        jne     6f
        pause
        dec     edx
        jnz     5b
        jmp     st_fail_reconf
6:
        # delete the save; the list no longer has it
        lea     rsi, [rip + name_selftest]
        xor     edx, edx
        mov     ecx, OP_DELETE
        call    request_named
        mov     edi, K_DELETED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     st_fail_delete
        call    do_list
        lea     rsi, [rip + name_selftest]
        call    list_has
        test    eax, eax
        jnz     st_fail_list
        lea     rsi, [rip + msg_pass]
        call    puts
        xor     eax, eax
        jmp     finish

st_fail_save:       mov eax, 1
                    jmp fail
st_fail_list:       mov eax, 2
                    jmp fail
st_fail_reconf:     mov eax, 3
                    jmp fail
st_fail_data:       mov eax, 4
                    jmp fail
st_fail_regs:       mov eax, 5
                    jmp fail
st_fail_counter:    mov eax, 6
                    jmp fail
st_fail_memory:     mov eax, 7
                    jmp fail
st_fail_disk:       mov eax, 8
                    jmp fail
st_fail_restore_ev: mov eax, 9
                    jmp fail
st_fail_delete:     mov eax, 10
                    jmp fail

# ===========================================================================
# writer: block n mod 64 gets the counter n; log[n mod 64] = n in memory.
# A restore or resume event checks that every logged block holds its entry.
# ===========================================================================
mode_writer:
        lea     rsi, [rip + msg_writer]
        call    puts
w_loop:
        call    w_step
        # poll for an event without waiting
        call    poll_event
        test    eax, eax
        jz      w_loop
        mov     rbx, [rip + ev_ptr]
        movzx   eax, word ptr [rbx + EV_KIND]
        cmp     eax, K_RESUMED
        je      w_check
        cmp     eax, K_RESTORED
        je      w_check
        jmp     w_loop

# w_step: one write of the writer: block n mod 64 gets the counter n,
# log[n mod 64] = n; rax = n.
w_step:
        push    rbx
        mov     rax, [rip + counter]
        inc     rax
        mov     [rip + counter], rax
        mov     rbx, rax
        and     rbx, 63
        mov     rdi, rbx
        mov     rsi, rax
        call    stamp_block
        mov     edi, BLK_WRITE
        mov     rsi, rbx
        call    blk_one
        lea     rdx, [rip + wlog]
        mov     rax, [rip + counter]
        mov     [rdx + rbx*8], rax
        pop     rbx
        ret

w_check:
        # every block 0..63 holds what the log says (0 = never written)
        xor     ebx, ebx
1:      mov     edi, BLK_READ
        mov     rsi, rbx
        call    blk_one
        lea     rdx, [rip + wlog]
        mov     rax, [rdx + rbx*8]
        lea     rsi, [rip + blk_buf]
        cmp     rax, [rsi + 8]
        je      2f
        # the one block being written at the pause may hold the new value
        mov     rax, [rip + counter]
        mov     rcx, rax
        and     rcx, 63
        cmp     rcx, rbx
        jne     w_fail
        cmp     rax, [rsi + 8]
        jne     w_fail
2:      inc     ebx
        cmp     ebx, 64
        jb      1b
        lea     rsi, [rip + msg_consistent]
        call    puts
        mov     rax, [rip + counter]
        call    puthex
        call    newline
        xor     eax, eax
        jmp     finish
w_fail:
        mov     eax, 30
        jmp     fail

# ===========================================================================
# migrate: the writer's loop; at block 500 ask to be migrated (no name: the
# VM's policy names the target) with app data. The migrated event on the
# new host must carry that app data (else 41), then the resumed event runs
# the writer's check. An error event (the migration failed) is 43, a
# resumed event without the migrated one first 42.
# ===========================================================================
mode_migrate:
        lea     rsi, [rip + msg_migrate]
        call    puts
m_loop:
        call    w_step
        cmp     rax, 500
        jne     1f
        lea     rsi, [rip + empty]
        lea     rdx, [rip + data_migrate]
        mov     ecx, OP_MIGRATE
        call    request_named
1:      call    poll_event
        test    eax, eax
        jz      m_loop
        mov     rbx, [rip + ev_ptr]
        movzx   eax, word ptr [rbx + EV_KIND]
        cmp     eax, K_MIGRATED
        je      m_migrated
        cmp     eax, K_RESUMED
        je      m_resumed
        cmp     eax, K_ERROR
        je      m_error
        jmp     m_loop
m_migrated:
        lea     rsi, [rip + data_migrate]
        call    check_ev_data
        test    eax, eax
        jnz     m_fail_data
        lea     rsi, [rip + msg_migrated]
        call    puts
        mov     qword ptr [rip + migrated], 1
        jmp     m_loop
m_resumed:
        cmp     qword ptr [rip + migrated], 1
        jne     m_fail_order
        jmp     w_check
m_fail_data:    mov eax, 41
                jmp fail
m_fail_order:   mov eax, 42
                jmp fail
m_error:        mov eax, 43
                jmp fail

# ===========================================================================
# badmac: a request with a wrong MAC, a replay and a stale epoch are
# refused with error events; a good save goes through once.
# ===========================================================================
mode_badmac:
        # wrong MAC: build a save "bad", then flip a MAC bit
        lea     rsi, [rip + name_bad]
        xor     edx, edx
        mov     ecx, OP_SAVE
        call    build_named
        xor     byte ptr [rip + req_buf + RQ_DATA], 1   # no app data: the MAC is at RQ_DATA
        call    send_built
        mov     edi, K_ERROR
        mov     esi, eax
        call    wait_event
        cmp     eax, 1                      # status 1: bad MAC
        jne     bm_fail1
        # a good save
        lea     rsi, [rip + name_good]
        xor     edx, edx
        mov     ecx, OP_SAVE
        call    request_named
        mov     edi, K_SAVED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     bm_fail2
        # the same bytes again: a replay
        call    send_built
        mov     edi, K_ERROR
        mov     esi, eax
        call    wait_event
        cmp     eax, 2                      # status 2: replayed
        jne     bm_fail3
        # a stale epoch
        mov     rax, [rip + cur_epoch]
        push    rax
        inc     qword ptr [rip + cur_epoch]
        lea     rsi, [rip + name_bad]
        xor     edx, edx
        mov     ecx, OP_SAVE
        call    request_named
        pop     rbx
        mov     [rip + cur_epoch], rbx
        mov     edi, K_ERROR
        mov     esi, eax
        call    wait_event
        cmp     eax, 3                      # status 3: wrong epoch
        jne     bm_fail4
        # only "good" exists
        call    do_list
        lea     rsi, [rip + name_good]
        call    list_has
        test    eax, eax
        jz      bm_fail5
        lea     rsi, [rip + name_bad]
        call    list_has
        test    eax, eax
        jnz     bm_fail5
        lea     rsi, [rip + msg_pass]
        call    puts
        xor     eax, eax
        jmp     finish
bm_fail1: mov eax, 41
          jmp fail
bm_fail2: mov eax, 42
          jmp fail
bm_fail3: mov eax, 43
          jmp fail
bm_fail4: mov eax, 44
          jmp fail
bm_fail5: mov eax, 45
          jmp fail

# ===========================================================================
# hwcheck: save "hw", then wait; after a restore, a hardware event names
# the new memory and vCPU count: check both.
# ===========================================================================
mode_hwcheck:
        # use the top page of memory, so a restore onto less is refused
        mov     rsi, [rip + boot_params]
        mov     rdi, [rsi + BP_MEMORY]
        sub     rdi, 4096
        mov     rax, 0x7070707070707070
        mov     [rdi], rax
        lea     rsi, [rip + name_hw]
        lea     rdx, [rip + data_save]
        mov     ecx, OP_SAVE
        call    request_named
        mov     edi, K_SAVED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     hw_fail1
        mov     rbx, [rip + ev_ptr]
        test    dword ptr [rbx + EV_FLAGS], F_AFTER_RESTORE
        jnz     hw_restored
        lea     rsi, [rip + msg_saved]
        call    puts
        # wait for the operator's restore
        mov     edi, K_RESUMED
        xor     esi, esi
        call    wait_event
        mov     eax, 51
        jmp     fail
hw_restored:
        lea     rsi, [rip + msg_restored]
        call    puts
        mov     edi, K_HARDWARE
        xor     esi, esi
        call    wait_event
        mov     rbx, [rip + ev_ptr]
        mov     ecx, [rbx + EV_TEXT_LEN]
        lea     rsi, [rbx + EV_TEXT + rcx]  # binary data after the text
        mov     rax, [rsi + 8]              # new memory bytes
        mov     [rip + hw_mem], rax
        mov     eax, [rsi + 20]             # new vCPU count
        mov     [rip + hw_vcpus], eax
        # the top page of the new memory is there
        mov     rdi, [rip + hw_mem]
        sub     rdi, 4096
        mov     rax, 0xa5a5a5a5c3c3c3c3
        mov     [rdi], rax
        cmp     rax, [rdi]
        jne     hw_fail2
        # every added vCPU came up (spin until each is marked alive)
        mov     ecx, 1
1:      cmp     ecx, [rip + hw_vcpus]
        jae     3f
        mov     edx, 500000
        lea     rax, [rip + ap_alive]
2:      cmp     qword ptr [rax + rcx*8], 0
        jne     4f
        pause
        dec     edx
        jnz     2b
        jmp     hw_fail3
4:      inc     ecx
        jmp     1b
3:      lea     rsi, [rip + msg_hwok]
        call    puts
        mov     rax, [rip + hw_mem]
        call    puthex
        mov     al, ' '
        call    putc
        mov     eax, [rip + hw_vcpus]
        call    puthex
        call    newline
        xor     eax, eax
        jmp     finish
hw_fail1: mov eax, 52
          jmp fail
hw_fail2: mov eax, 53
          jmp fail
hw_fail3: mov eax, 54
          jmp fail

# ===========================================================================
# identity: record identity and generation, save "base", wait. Resumed as a
# clone: a generation event arrives and info shows another identity.
# ===========================================================================
mode_identity:
        call    do_info
        lea     rsi, [rip + msg_identity]
        call    puts
        mov     rax, [rip + id_gen]
        call    puthex
        call    newline
        mov     rax, [rip + id_uuid]
        mov     [rip + first_uuid], rax
        mov     rax, [rip + id_gen]
        mov     [rip + first_gen], rax
        lea     rsi, [rip + name_base]
        xor     edx, edx
        mov     ecx, OP_SAVE
        call    request_named
        mov     edi, K_SAVED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     id_fail1
        mov     rbx, [rip + ev_ptr]
        test    dword ptr [rbx + EV_FLAGS], F_AFTER_RESTORE
        jnz     id_resumed
        lea     rsi, [rip + msg_saved]
        call    puts
        mov     edi, K_GENERATION
        xor     esi, esi
        call    wait_event
        mov     eax, 61
        jmp     fail
id_resumed:
        mov     edi, K_GENERATION
        xor     esi, esi
        call    wait_event
        call    do_info
        mov     rax, [rip + id_gen]
        cmp     rax, [rip + first_gen]
        je      id_fail2
        mov     rax, [rip + id_uuid]
        cmp     rax, [rip + first_uuid]
        je      id_fail3
        lea     rsi, [rip + msg_newid]
        call    puts
        mov     rax, [rip + id_gen]
        call    puthex
        call    newline
        xor     eax, eax
        jmp     finish
id_fail1: mov eax, 62
          jmp fail
id_fail2: mov eax, 63
          jmp fail
id_fail3: mov eax, 64
          jmp fail

# ===========================================================================
# dirty: touch `arg` pages from DIRTY_BASE on, round after round.
# ===========================================================================
mode_dirty:
        lea     rsi, [rip + msg_dirty]
        call    puts
        xor     r8, r8
1:      inc     r8
        mov     rsi, [rip + boot_params]
        mov     ecx, [rsi + BP_ARG]
        mov     rdi, DIRTY_BASE
2:      mov     [rdi], r8
        add     rdi, 4096
        dec     ecx
        jnz     2b
        call    poll_event
        jmp     1b

# ===========================================================================
# helpers
# ===========================================================================

# fail: eax = code. Print it and leave through the exit port.
fail:
        mov     ebx, eax
        lea     rsi, [rip + msg_fail]
        call    puts
        mov     eax, ebx
        call    puthex
        call    newline
        mov     eax, ebx
finish:
        mov     dx, PORT_EXIT
        out     dx, al
1:      hlt
        jmp     1b

putc:   # al
        push    rdx
        mov     dx, SERIAL
        out     dx, al
        pop     rdx
        ret

puts:   # rsi = NUL-terminated string
        push    rax
        push    rdx
        mov     dx, SERIAL
1:      lodsb
        test    al, al
        jz      2f
        out     dx, al
        jmp     1b
2:      pop     rdx
        pop     rax
        ret

newline:
        mov     al, 10
        jmp     putc

puthex: # rax, 16 hex digits
        push    rbx
        push    rcx
        mov     rbx, rax
        mov     ecx, 16
1:      rol     rbx, 4
        mov     eax, ebx
        and     eax, 15
        cmp     eax, 10
        jb      2f
        add     eax, 'a' - 10 - '0'
2:      add     eax, '0'
        call    putc
        dec     ecx
        jnz     1b
        pop     rcx
        pop     rbx
        ret

# checksum: rsi = address, ecx = qwords -> rax
checksum:
        xor     eax, eax
1:      rol     rax, 7
        xor     rax, [rsi]
        add     rsi, 8
        dec     ecx
        jnz     1b
        ret

# stamp_block: fill blk_buf with block number rdi and value rsi
stamp_block:
        lea     rdx, [rip + blk_buf]
        mov     [rdx], rdi
        mov     [rdx + 8], rsi
        mov     ecx, 62
        lea     r8, [rdx + 16]
        mov     rax, rsi
        xor     rax, rdi
1:      mov     [r8], rax
        add     r8, 8
        dec     ecx
        jnz     1b
        ret

# blk_one: edi = op, rsi = sector; one 512-byte sector of disk blk_disk
# via blk_buf.
# Returns eax = status; a failed request ends the test.
blk_one:
        lea     rdx, [rip + blk_desc]
        mov     [rdx], edi
        mov     dword ptr [rdx + 4], 0xffffffff
        mov     [rdx + 8], rsi
        mov     dword ptr [rdx + 16], 1
        mov     eax, [rip + blk_disk]
        mov     [rdx + 20], eax
        lea     rax, [rip + blk_buf]
        mov     [rdx + 24], rax
        mov     eax, edx
        mov     dx, PORT_BLK
        out     dx, eax
        lea     rdx, [rip + blk_desc]
        mov     eax, [rdx + 4]
        test    eax, eax
        jnz     1f
        ret
1:      mov     eax, 80
        jmp     fail

# disk_sum: checksum of blocks 0..7 (and block 0 of disk 1) -> rax
disk_sum:
        push    rbx
        push    r9
        xor     r9, r9
        xor     ebx, ebx
1:      mov     edi, BLK_READ
        mov     rsi, rbx
        call    blk_one
        lea     rsi, [rip + blk_buf]
        mov     ecx, 64
        call    checksum
        rol     r9, 13
        xor     r9, rax
        inc     ebx
        cmp     ebx, 8
        jb      1b
        mov     rsi, [rip + boot_params]
        cmp     dword ptr [rsi + BP_DISKS], 2
        jb      2f
        mov     dword ptr [rip + blk_disk], 1
        mov     edi, BLK_READ
        xor     esi, esi
        call    blk_one
        mov     dword ptr [rip + blk_disk], 0
        lea     rsi, [rip + blk_buf]
        mov     ecx, 64
        call    checksum
        rol     r9, 13
        xor     r9, rax
2:      mov     rax, r9
        pop     r9
        pop     rbx
        ret

# build_named: rsi = NUL-terminated name, rdx = NUL-terminated app data (or
# 0), ecx = op. Fills req_buf (with a fresh sequence number and the MAC).
build_named:
        push    rbx
        push    rcx
        lea     rdi, [rip + req_buf]
        # zero the request area (name field and data)
        push    rdi
        push    rsi
        mov     ecx, 0x1100 / 8
        xor     eax, eax
        rep stosq
        pop     rsi
        pop     rdi
        # name
        xor     ecx, ecx
1:      mov     al, [rsi + rcx]
        test    al, al
        jz      2f
        mov     [rdi + RQ_NAME + rcx], al
        inc     ecx
        jmp     1b
2:      mov     [rdi + RQ_NAME_LEN], ecx
        # app data
        xor     ecx, ecx
        test    rdx, rdx
        jz      4f
3:      mov     al, [rdx + rcx]
        test    al, al
        jz      4f
        mov     [rdi + RQ_DATA + rcx], al
        inc     ecx
        jmp     3b
4:      mov     [rdi + RQ_DATA_LEN], ecx
        pop     rcx
        mov     [rdi + RQ_OP], cx
        call    seal
        pop     rbx
        ret

# build with arguments already in req_buf RQ_ARG0/RQ_ARG1 (kept), no name
request_args:
        lea     rdi, [rip + req_buf]
        mov     r10, [rdi + RQ_ARG0]
        mov     r11, [rdi + RQ_ARG1]
        push    r10
        push    r11
        call    build_named_noname
        pop     r11
        pop     r10
        lea     rdi, [rip + req_buf]
        mov     [rdi + RQ_ARG0], r10
        mov     [rdi + RQ_ARG1], r11
        call    seal
        jmp     send_built

build_named_noname:
        lea     rsi, [rip + empty]
        xor     edx, edx
        jmp     build_named

# request_named: build and send; eax = request id
request_named:
        call    build_named
        jmp     send_built

# seal: set magic, version, epoch and a new sequence number, then the MAC
# (SipHash-2-4-128 of bytes 0 .. RQ_DATA + round_up(data_len, 8)) after it.
seal:
        push    rbx
        lea     rdi, [rip + req_buf]
        mov     dword ptr [rdi], RQ_MAGIC
        mov     word ptr [rdi + 4], 1
        mov     rax, [rip + cur_epoch]
        mov     [rdi + RQ_EPOCH], rax
        mov     rax, [rip + seq]
        inc     rax
        mov     [rip + seq], rax
        mov     [rdi + RQ_SEQ], rax
        mov     ecx, [rdi + RQ_DATA_LEN]
        add     ecx, 7
        and     ecx, -8
        add     ecx, RQ_DATA
        mov     rsi, rdi
        mov     ebx, ecx
        call    siphash128
        lea     rdi, [rip + req_buf]
        mov     [rdi + rbx], rax
        mov     [rdi + rbx + 8], rdx
        pop     rbx
        ret

# send_built: the request in req_buf to port A; eax = request id
send_built:
        lea     rax, [rip + req_buf]
        mov     dx, PORT_A
        out     dx, eax
        in      eax, dx
        ret

# siphash128: rsi = message, ecx = length (a multiple of 8) -> rdx:rax
siphash128:
        push    rbx
        push    r12
        push    r13
        push    r14
        push    r15
        mov     rbx, [rip + boot_params]
        mov     r12, [rbx + BP_KEY]          # k0
        mov     r13, [rbx + BP_KEY + 8]      # k1
        mov     r8, 0x736f6d6570736575
        xor     r8, r12                      # v0
        mov     r9, 0x646f72616e646f6d
        xor     r9, r13                      # v1
        mov     r10, 0x6c7967656e657261
        xor     r10, r12                     # v2
        mov     r11, 0x7465646279746573
        xor     r11, r13                     # v3
        xor     r9, 0xee
        mov     r14d, ecx                    # length, for the last block
        shr     ecx, 3
        jz      2f
1:      mov     r15, [rsi]
        xor     r11, r15
        call    sipround
        call    sipround
        xor     r8, r15
        add     rsi, 8
        dec     ecx
        jnz     1b
2:      mov     r15, r14
        shl     r15, 56
        xor     r11, r15
        call    sipround
        call    sipround
        xor     r8, r15
        xor     r10, 0xee
        call    sipround
        call    sipround
        call    sipround
        call    sipround
        mov     rax, r8
        xor     rax, r9
        xor     rax, r10
        xor     rax, r11
        push    rax
        xor     r9, 0xdd
        call    sipround
        call    sipround
        call    sipround
        call    sipround
        mov     rdx, r8
        xor     rdx, r9
        xor     rdx, r10
        xor     rdx, r11
        pop     rax
        pop     r15
        pop     r14
        pop     r13
        pop     r12
        pop     rbx
        ret

sipround:
        add     r8, r9
        rol     r9, 13
        xor     r9, r8
        rol     r8, 32
        add     r10, r11
        rol     r11, 16
        xor     r11, r10
        add     r8, r11
        rol     r11, 21
        xor     r11, r8
        add     r10, r9
        rol     r9, 17
        xor     r9, r10
        rol     r10, 32
        ret

# poll_event: fetch the next event into ev_buf if there is one; eax = its
# length (0: none). Every event carries the current epoch.
poll_event:
        push    rdx
        mov     dx, PORT_B
        in      eax, dx
        test    eax, eax
        jz      1f
        push    rax
        lea     rax, [rip + ev_buf]
        out     dx, eax
        lea     rax, [rip + ev_buf]
        mov     [rip + ev_ptr], rax
        mov     rdx, [rax + EV_EPOCH]
        mov     [rip + cur_epoch], rdx
        pop     rax
1:      pop     rdx
        ret

# wait_event: edi = kind, esi = request id (0: any). Waits for an event of
# that kind (or an error for that id); eax = its status. Others are noted.
wait_event:
        push    rbx
        mov     r8d, edi
        mov     r9d, esi
1:      call    poll_event
        test    eax, eax
        jnz     2f
        pause
        jmp     1b
2:      mov     rbx, [rip + ev_ptr]
        movzx   eax, word ptr [rbx + EV_KIND]
        mov     ecx, [rbx + EV_ID]
        cmp     eax, K_ERROR
        jne     3f
        test    r9d, r9d
        jz      3f
        cmp     ecx, r9d
        jne     3f
        mov     eax, [rbx + EV_STATUS]
        test    eax, eax
        jnz     5f
        mov     eax, 99
        jmp     5f
3:      cmp     eax, r8d
        jne     4f
        test    r9d, r9d
        jz      6f
        cmp     ecx, r9d
        jne     4f
6:      mov     eax, [rbx + EV_STATUS]
        jmp     5f
4:      lea     rsi, [rip + msg_event]
        call    puts
        movzx   eax, word ptr [rbx + EV_KIND]
        call    puthex
        call    newline
        jmp     1b
5:      pop     rbx
        ret

# check_ev_data: rsi = NUL-terminated expected app data; eax = 0 if the
# event in ev_buf carries exactly it.
check_ev_data:
        mov     rbx, [rip + ev_ptr]
        mov     ecx, [rbx + EV_TEXT_LEN]
        lea     rdi, [rbx + EV_TEXT + rcx]
        mov     r8d, [rbx + EV_DATA_LEN]
        xor     ecx, ecx
1:      mov     al, [rsi + rcx]
        test    al, al
        jz      2f
        cmp     ecx, r8d
        jae     3f
        cmp     al, [rdi + rcx]
        jne     3f
        inc     ecx
        jmp     1b
2:      cmp     ecx, r8d
        jne     3f
        xor     eax, eax
        ret
3:      mov     eax, 1
        ret

do_info:
        xor     esi, esi
        xor     edx, edx
        lea     rsi, [rip + empty]
        mov     ecx, OP_INFO
        call    request_named
        mov     edi, K_INFO
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     1f
        mov     rbx, [rip + ev_ptr]
        mov     ecx, [rbx + EV_TEXT_LEN]
        lea     rsi, [rbx + EV_TEXT + rcx]
        mov     rax, [rsi]                  # first 8 bytes of the LUN UUID
        mov     [rip + id_uuid], rax
        mov     rax, [rsi + 16]             # generation
        mov     [rip + id_gen], rax
        ret
1:      mov     eax, 81
        jmp     fail

do_list:
        lea     rsi, [rip + empty]
        xor     edx, edx
        mov     ecx, OP_LIST
        call    request_named
        mov     edi, K_LISTED
        mov     esi, eax
        call    wait_event
        test    eax, eax
        jnz     1f
        ret
1:      mov     eax, 82
        jmp     fail

# list_has: rsi = NUL-terminated name; eax = 1 if the LISTED event in
# ev_buf names it (names are separated by newlines).
list_has:
        mov     rbx, [rip + ev_ptr]
        mov     r8d, [rbx + EV_TEXT_LEN]
        lea     rdi, [rbx + EV_TEXT]
        lea     r9, [rdi + r8]              # end of text
1:      cmp     rdi, r9
        jae     5f
        # compare the name at rdi with rsi up to a newline or the end
        xor     ecx, ecx
2:      mov     al, [rsi + rcx]
        lea     r10, [rdi + rcx]
        cmp     r10, r9
        jae     3f
        mov     dl, [r10]
        cmp     dl, 10
        je      3f
        cmp     al, dl
        jne     4f
        inc     ecx
        jmp     2b
3:      test    al, al
        jnz     4f
        mov     eax, 1
        ret
4:      # skip to after the next newline
        cmp     rdi, r9
        jae     5f
        mov     al, [rdi]
        inc     rdi
        cmp     al, 10
        jne     4b
        jmp     1b
5:      xor     eax, eax
        ret

# ---------------------------------------------------------------------------
        .section .rodata
msg_hello:      .asciz "payload: up\n"
msg_saved:      .asciz "payload: saved, going on\n"
msg_restored:   .asciz "payload: restored to the save point\n"
msg_pass:       .asciz "SELFTEST PASS\n"
msg_fail:       .asciz "SELFTEST FAIL "
msg_event:      .asciz "payload: event "
msg_writer:     .asciz "payload: writer\n"
msg_consistent: .asciz "WRITER CONSISTENT "
msg_hwok:       .asciz "HWCHECK OK "
msg_identity:   .asciz "IDENTITY generation "
msg_newid:      .asciz "IDENTITY CHANGED generation "
msg_dirty:      .asciz "payload: dirtying pages\n"
msg_migrate:    .asciz "payload: migrate\n"
msg_migrated:   .asciz "payload: migrated with my app data\n"
data_migrate:   .asciz "app-data:migrate:9"
name_selftest:  .asciz "selftest"
name_bad:       .asciz "bad"
name_good:      .asciz "good"
name_hw:        .asciz "hw"
name_base:      .asciz "base"
data_save:      .asciz "app-data:save:42"
data_restore:   .asciz "app-data:restore:7"
empty:          .asciz ""

# ---------------------------------------------------------------------------
        .section .data
        .balign 8
boot_params:    .quad 0
cur_epoch:      .quad 0
seq:            .quad 0
counter:        .quad 0
saved_sum:      .quad 0
saved_disk:     .quad 0
save_id:        .quad 0
ev_ptr:         .quad 0
id_uuid:        .quad 0
migrated:       .quad 0
id_gen:         .quad 0
first_uuid:     .quad 0
first_gen:      .quad 0
hw_mem:         .quad 0
hw_vcpus:       .quad 0
blk_disk:       .quad 0
ap_alive:       .fill 256, 8, 0
wlog:           .fill 64, 8, 0
        .balign 64
blk_desc:       .fill 32, 1, 0
        .balign 512
blk_buf:        .fill 512, 1, 0
        .balign 4096
req_buf:        .fill 0x1100, 1, 0
        .balign 4096
ev_buf:         .fill 0x2000, 1, 0
