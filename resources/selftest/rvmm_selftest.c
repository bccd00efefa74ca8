// SPDX-License-Identifier: GPL-2.0
/*
 * rvmm in-guest device self-test (built into rvmm's *test* kernel only).
 *
 * Why this exists: some device behaviour is only visible from inside the
 * guest kernel and no user-space test here reaches it (a read past the page
 * cache, a read-only disk refusing the block layer's writes, GET_ID, discard,
 * flush, hvc0, the ACPI tables as the kernel parsed them). This code runs
 * inside the kernel, after the root file system is mounted and just before
 * init would be executed, and exercises rvmm's devices through Linux's own
 * drivers: the VFS, the page cache, the block layer and the tty layer. It
 * never touches device registers itself. Network, vsock and rng are covered
 * from guest user space (rvmm's tests/net.rs).
 *
 * It is enabled at boot with a comma-separated list of checks or groups:
 *
 *	rvmm_selftest=blk,console
 *
 * Without that switch rvmm_selftest_run() returns at once and the boot goes
 * on normally. With it, each selected check prints exactly one line
 *
 *	RVMM-SELFTEST <name> ok <detail>
 *	RVMM-SELFTEST <name> fail <detail>
 *
 * followed by
 *
 *	RVMM-SELFTEST done passed=<n> failed=<m>
 *
 * and then the machine is restarted (kernel_restart()); with reboot=k rvmm
 * sees the keyboard-controller reset and exits 0. With
 *
 *	rvmm_selftest.poweroff=1
 *
 * it is powered off instead (kernel_power_off(): ACPI S5 through rvmm's sleep
 * control register, which also ends rvmm with 0). rvmm's host tests parse
 * these lines: keep the format exactly as it is.
 *
 * The VM the host test starts has: vda = ext4 root (rw), vdb = read-only disk
 * with a serial, vdc = scratch disk (rw, at least 1 MiB, its content is
 * overwritten), and, for "console", a virtio-console (hvc0).
 *
 * "acpi" reports the ACPI tables rvmm generated (their signatures and OEM id,
 * as /sys/firmware/acpi/tables would list them) and how many virtio-mmio
 * devices (LNRO0005) the DSDT described to the kernel.
 *
 * Guest kernel code may run at ~1 MIPS (emulated), so the checks move little
 * data and avoid expensive formatting in loops.
 *
 * Adding a check: write a function with the check_fn signature and add it to
 * the checks[] table with its name and group.
 */

#include <linux/acpi.h>
#include <linux/blkdev.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/uaccess.h>
#include <linux/mount.h>
#include <linux/pagemap.h>
#include <linux/printk.h>
#include <linux/reboot.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/string.h>

/* Declared here rather than in a header: init/main.c is the only caller. */
void rvmm_selftest_run(void);

#define TAG "RVMM-SELFTEST"

/*
 * The result lines must reach the console even when the command line says
 * "quiet" (console_loglevel 4), so they are printed at KERN_EMERG. Progress
 * chatter is KERN_INFO and may be hidden.
 */
#define result(fmt, ...) pr_emerg(TAG " " fmt "\n", ##__VA_ARGS__)
#define info(fmt, ...) pr_info("rvmm-selftest: " fmt "\n", ##__VA_ARGS__)

/* The rvmm_selftest= value; kept after boot (the checks run after init memory is freed). */
static char selftest_arg[256];

static int __init rvmm_selftest_setup(char *str)
{
	strscpy(selftest_arg, str, sizeof(selftest_arg));
	return 1;
}
__setup("rvmm_selftest=", rvmm_selftest_setup);

/* rvmm_selftest.poweroff=1: end with kernel_power_off() instead of kernel_restart(). */
static bool selftest_poweroff;

static int __init rvmm_selftest_poweroff_setup(char *str)
{
	if (kstrtobool(str, &selftest_poweroff))
		selftest_poweroff = false;
	return 1;
}
__setup("rvmm_selftest.poweroff=", rvmm_selftest_poweroff_setup);

/*
 * A check fills @detail (one line, no newline) and returns true if it passed.
 */
typedef bool (*check_fn)(char *detail, size_t len);

/* ---- block: write, fsync, drop the page cache, read back --------------------- */

#define BLK_WRITE_PATH "/rvmm-selftest.dat"
#define BLK_WRITE_SIZE SZ_64K
#define PATTERN_LINE_LEN 21 /* strlen("rvmm-selftest 000000\n") */

/*
 * Fill @buf with "rvmm-selftest %06u\n" for u = 0, 1, 2, ..., cut off at
 * @len bytes. The digits are written by hand: a few thousand snprintf()
 * calls would cost seconds of emulated CPU time.
 */
static void fill_pattern(char *buf, size_t len)
{
	char line[PATTERN_LINE_LEN];
	unsigned int u, v;
	size_t off, n;
	int i;

	memcpy(line, "rvmm-selftest ", 14);
	line[PATTERN_LINE_LEN - 1] = '\n';
	for (u = 0, off = 0; off < len; u++, off += n) {
		for (v = u, i = 19; i >= 14; i--, v /= 10)
			line[i] = '0' + v % 10;
		n = min_t(size_t, len - off, PATTERN_LINE_LEN);
		memcpy(buf + off, line, n);
	}
}

/* Index of the first byte where @a and @b differ, or -1 if they are equal. */
static long first_difference(const char *a, const char *b, size_t len)
{
	size_t i;

	if (!memcmp(a, b, len))
		return -1;
	for (i = 0; a[i] == b[i]; i++)
		;
	return i;
}

static bool check_blk_write(char *detail, size_t len)
{
	struct address_space *mapping;
	unsigned long cached, left;
	char *want = NULL, *got = NULL;
	struct super_block *sb;
	struct file *file;
	bool ok = false;
	loff_t pos;
	ssize_t n;
	long diff;
	int err;

	want = kvmalloc(BLK_WRITE_SIZE, GFP_KERNEL);
	got = kvmalloc(BLK_WRITE_SIZE, GFP_KERNEL);
	if (!want || !got) {
		scnprintf(detail, len, "out of memory");
		goto out_free;
	}
	fill_pattern(want, BLK_WRITE_SIZE);

	file = filp_open(BLK_WRITE_PATH, O_RDWR | O_CREAT | O_TRUNC | O_LARGEFILE, 0644);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open %s: %pe", BLK_WRITE_PATH, file);
		goto out_free;
	}

	pos = 0;
	n = kernel_write(file, want, BLK_WRITE_SIZE, &pos);
	if (n != BLK_WRITE_SIZE) {
		scnprintf(detail, len, "write of %d bytes returned %zd", BLK_WRITE_SIZE, n);
		goto out_close;
	}
	err = vfs_fsync(file, 0);
	if (err) {
		scnprintf(detail, len, "fsync: %pe", ERR_PTR(err));
		goto out_close;
	}

	/*
	 * Drop the file's pages from the page cache so that the read below has
	 * to come from the disk through rvmm's virtio-blk queue. After the
	 * fsync they are clean, so invalidation must be able to drop them all.
	 */
	mapping = file->f_mapping;
	cached = mapping->nrpages;
	err = filemap_write_and_wait(mapping);
	if (!err)
		err = invalidate_inode_pages2(mapping);
	left = mapping->nrpages;
	if (err || left) {
		scnprintf(detail, len, "could not drop the page cache (%pe, %lu of %lu pages left)",
			  ERR_PTR(err), left, cached);
		goto out_close;
	}

	memset(got, 0, BLK_WRITE_SIZE);
	pos = 0;
	n = kernel_read(file, got, BLK_WRITE_SIZE, &pos);
	if (n != BLK_WRITE_SIZE) {
		scnprintf(detail, len, "re-read of %d bytes returned %zd", BLK_WRITE_SIZE, n);
		goto out_close;
	}
	diff = first_difference(want, got, BLK_WRITE_SIZE);
	if (diff >= 0) {
		scnprintf(detail, len, "re-read differs at byte %ld (0x%02x, want 0x%02x)",
			  diff, (u8)got[diff], (u8)want[diff]);
		goto out_close;
	}

	/*
	 * The host test reads the file from the image with debugfs, which does
	 * not replay the ext4 journal, and the VM is restarted without an
	 * unmount. Freezing the file system checkpoints the journal, writing
	 * every metadata block to its home location.
	 */
	sb = file_inode(file)->i_sb;
	err = freeze_super(sb);
	if (!err)
		err = thaw_super(sb);
	if (err) {
		scnprintf(detail, len, "journal checkpoint (freeze/thaw): %pe", ERR_PTR(err));
		goto out_close;
	}

	scnprintf(detail, len,
		  "%s: wrote %d bytes, fsync ok, re-read them from the disk (page cache dropped: %lu pages -> 0), content matches",
		  BLK_WRITE_PATH, BLK_WRITE_SIZE, cached);
	ok = true;
out_close:
	filp_close(file, NULL);
out_free:
	kvfree(got);
	kvfree(want);
	return ok;
}

/* ---- block: a read-only disk refuses writes ---------------------------------- */

#define BLK_RO_DEV "/dev/vdb"

static bool check_blk_ro(char *detail, size_t len)
{
	struct block_device *bdev;
	struct file *file;
	char sector[512];
	bool ro;
	loff_t pos;
	ssize_t n;

	bdev = blkdev_get_by_path(BLK_RO_DEV, FMODE_READ, NULL);
	if (IS_ERR(bdev)) {
		scnprintf(detail, len, "open %s: %pe", BLK_RO_DEV, bdev);
		return false;
	}
	ro = bdev_read_only(bdev);
	blkdev_put(bdev, FMODE_READ);
	if (!ro) {
		scnprintf(detail, len, "%s is not read-only (bdev_read_only=0)", BLK_RO_DEV);
		return false;
	}

	/* Linux 6.1 lets a read-only disk be opened for writing; a write must fail. */
	file = filp_open(BLK_RO_DEV, O_RDWR | O_LARGEFILE, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "%s: bdev_read_only=1, open for writing fails with %pe",
			  BLK_RO_DEV, file);
		return true;
	}

	/*
	 * Write back what is already there, so that a device that wrongly
	 * accepts the write at least keeps its content.
	 */
	pos = 0;
	n = kernel_read(file, sector, sizeof(sector), &pos);
	if (n != sizeof(sector)) {
		scnprintf(detail, len, "read of sector 0 returned %zd", n);
		filp_close(file, NULL);
		return false;
	}
	pos = 0;
	n = kernel_write(file, sector, sizeof(sector), &pos);
	filp_close(file, NULL);
	if (n >= 0) {
		scnprintf(detail, len, "%s: bdev_read_only=1 but a write of %zu bytes returned %zd",
			  BLK_RO_DEV, sizeof(sector), n);
		return false;
	}
	scnprintf(detail, len, "%s: bdev_read_only=1, open for writing ok, write fails with %pe",
		  BLK_RO_DEV, ERR_PTR(n));
	return true;
}

/* ---- block: the disk serial (virtio-blk GET_ID) -------------------------------- */

#define BLK_SERIAL_DISK "vdb"

static bool check_blk_serial(char *detail, size_t len)
{
	struct file_system_type *sysfs;
	struct vfsmount *mnt;
	struct file *file;
	char serial[64];
	loff_t pos = 0;
	ssize_t n, i;

	/*
	 * Nothing has mounted /sys yet (init would), so mount a private
	 * instance of sysfs and read the attribute through it; reading it makes
	 * virtio-blk send a GET_ID request to the device.
	 */
	sysfs = get_fs_type("sysfs");
	if (!sysfs) {
		scnprintf(detail, len, "no sysfs");
		return false;
	}
	mnt = kern_mount(sysfs);
	put_filesystem(sysfs);
	if (IS_ERR(mnt)) {
		scnprintf(detail, len, "mount sysfs: %pe", mnt);
		return false;
	}

	file = file_open_root_mnt(mnt, "block/" BLK_SERIAL_DISK "/serial", O_RDONLY, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open /sys/block/%s/serial: %pe", BLK_SERIAL_DISK, file);
		kern_unmount(mnt);
		return false;
	}
	n = kernel_read(file, serial, sizeof(serial) - 1, &pos);
	filp_close(file, NULL);
	kern_unmount(mnt);
	if (n < 0) {
		scnprintf(detail, len, "read /sys/block/%s/serial: %pe", BLK_SERIAL_DISK, ERR_PTR(n));
		return false;
	}

	/* Keep the result line one line of printable ASCII. */
	while (n > 0 && (serial[n - 1] == '\n' || serial[n - 1] == '\0'))
		n--;
	serial[n] = '\0';
	for (i = 0; i < n; i++)
		if (serial[i] < 0x21 || serial[i] > 0x7e)
			serial[i] = '?';

	scnprintf(detail, len, "%s=%s", BLK_SERIAL_DISK, serial);
	return n > 0;
}

/* ---- block: discard on the scratch disk ---------------------------------------- */

#define BLK_DISCARD_DEV "/dev/vdc"
#define BLK_DISCARD_SIZE SZ_1M

static bool check_blk_discard(char *detail, size_t len)
{
	struct block_device *bdev;
	struct inode *bd_inode;
	char *buf, *zero_check;
	struct file *file;
	unsigned int max;
	bool ok = false, zeroes;
	loff_t pos;
	ssize_t n;
	int err, i;

	buf = kvmalloc(SZ_64K, GFP_KERNEL);
	if (!buf) {
		scnprintf(detail, len, "out of memory");
		return false;
	}
	fill_pattern(buf, SZ_64K); /* any non-zero data will do */

	file = filp_open(BLK_DISCARD_DEV, O_RDWR | O_LARGEFILE, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open %s: %pe", BLK_DISCARD_DEV, file);
		goto out_free;
	}
	bd_inode = file->f_mapping->host;
	bdev = I_BDEV(bd_inode);
	if (bdev_nr_bytes(bdev) < BLK_DISCARD_SIZE) {
		scnprintf(detail, len, "%s is smaller than %d bytes", BLK_DISCARD_DEV, BLK_DISCARD_SIZE);
		goto out_close;
	}
	max = bdev_max_discard_sectors(bdev);
	if (!max) {
		scnprintf(detail, len, "%s does not support discard", BLK_DISCARD_DEV);
		goto out_close;
	}

	/* 1 MiB of data at offset 0, so that the host image has blocks there... */
	for (pos = 0; pos < BLK_DISCARD_SIZE;) {
		n = kernel_write(file, buf, SZ_64K, &pos);
		if (n != SZ_64K) {
			scnprintf(detail, len, "write at %lld returned %zd", pos, n);
			goto out_close;
		}
	}
	err = vfs_fsync(file, 0);
	if (err) {
		scnprintf(detail, len, "fsync: %pe", ERR_PTR(err));
		goto out_close;
	}

	/*
	 * ...then discard it, as the BLKDISCARD ioctl does: drop the range from
	 * the page cache and send the discard down to the device.
	 */
	inode_lock(bd_inode);
	filemap_invalidate_lock(bd_inode->i_mapping);
	err = truncate_bdev_range(bdev, file->f_mode, 0, BLK_DISCARD_SIZE - 1);
	if (!err)
		err = blkdev_issue_discard(bdev, 0, BLK_DISCARD_SIZE >> SECTOR_SHIFT, GFP_KERNEL);
	filemap_invalidate_unlock(bd_inode->i_mapping);
	inode_unlock(bd_inode);
	if (err) {
		scnprintf(detail, len, "discard of %d bytes at 0: %pe", BLK_DISCARD_SIZE, ERR_PTR(err));
		goto out_close;
	}

	/*
	 * For information only (a discard need not zero): what the first 4 KiB
	 * read back as, from the disk (the range is no longer cached).
	 */
	zero_check = buf;
	pos = 0;
	n = kernel_read(file, zero_check, SZ_4K, &pos);
	zeroes = n == SZ_4K;
	for (i = 0; zeroes && i < SZ_4K; i++)
		zeroes = !zero_check[i];

	scnprintf(detail, len,
		  "%s: wrote+fsynced %d bytes at 0, discarded them (max_discard_sectors=%u), reads back as zeroes: %s",
		  BLK_DISCARD_DEV, BLK_DISCARD_SIZE, max, n == SZ_4K ? (zeroes ? "yes" : "no") : "read failed");
	ok = true;
out_close:
	filp_close(file, NULL);
out_free:
	kvfree(buf);
	return ok;
}

/* ---- block: cache flush on the root disk ---------------------------------------- */

#define BLK_FLUSH_DEV "/dev/vda"

static bool check_blk_flush(char *detail, size_t len)
{
	struct block_device *bdev;
	bool wc;
	int err;

	bdev = blkdev_get_by_path(BLK_FLUSH_DEV, FMODE_READ, NULL);
	if (IS_ERR(bdev)) {
		scnprintf(detail, len, "open %s: %pe", BLK_FLUSH_DEV, bdev);
		return false;
	}
	/*
	 * Without a volatile write cache (VIRTIO_BLK_F_FLUSH not negotiated)
	 * the block layer completes a flush without sending it to the device,
	 * which would test nothing; rvmm offers the feature.
	 */
	wc = bdev_write_cache(bdev);
	err = blkdev_issue_flush(bdev);
	blkdev_put(bdev, FMODE_READ);
	if (!wc) {
		scnprintf(detail, len, "%s has no volatile write cache: flushes never reach the device",
			  BLK_FLUSH_DEV);
		return false;
	}
	if (err) {
		scnprintf(detail, len, "%s: blkdev_issue_flush: %pe", BLK_FLUSH_DEV, ERR_PTR(err));
		return false;
	}
	scnprintf(detail, len, "%s: write cache on, blkdev_issue_flush returned 0", BLK_FLUSH_DEV);
	return true;
}

/* ---- console: a line through virtio-console (hvc0) ------------------------------ */

#define HVC_DEV "/dev/hvc0"
#define HVC_LINE "RVMM-SELFTEST-HVC hello from hvc0\n"

static bool check_console(char *detail, size_t len)
{
	struct file *file;
	loff_t pos = 0;
	ssize_t n;

	/* O_NOCTTY: this task (the future init) must not acquire a controlling tty. */
	file = filp_open(HVC_DEV, O_WRONLY | O_NOCTTY, 0);
	if (IS_ERR(file)) {
		if (PTR_ERR(file) == -ENOENT || PTR_ERR(file) == -ENODEV || PTR_ERR(file) == -ENXIO)
			scnprintf(detail, len, "no hvc0 (%pe)", file);
		else
			scnprintf(detail, len, "open %s: %pe", HVC_DEV, file);
		return false;
	}
	n = kernel_write(file, HVC_LINE, strlen(HVC_LINE), &pos);
	/* The last close waits (briefly) for hvc to push the output out. */
	filp_close(file, NULL);
	if (n != strlen(HVC_LINE)) {
		scnprintf(detail, len, "write of %zu bytes to %s returned %zd", strlen(HVC_LINE),
			  HVC_DEV, n);
		return false;
	}
	scnprintf(detail, len, "wrote %zd bytes to %s", n, HVC_DEV);
	return true;
}

/* ---- the table of checks and the runner ------------------------------------------ */

/* ---- acpi: the tables the kernel found and the devices the DSDT described ---- */

static bool check_acpi(char *detail, size_t len)
{
#ifdef CONFIG_ACPI
	static const char *const sigs[] = { ACPI_SIG_FADT, ACPI_SIG_MADT, ACPI_SIG_DSDT };
	char oem[ACPI_OEM_ID_SIZE + 1] = "";
	struct acpi_table_header *hdr;
	struct acpi_device *adev;
	unsigned int virtio = 0;
	size_t i, off = 0;
	bool ok = true;

	off += scnprintf(detail + off, len - off, "tables=");
	for (i = 0; i < ARRAY_SIZE(sigs); i++) {
		if (ACPI_FAILURE(acpi_get_table((char *)sigs[i], 1, &hdr))) {
			off += scnprintf(detail + off, len - off, "%s-missing,", sigs[i]);
			ok = false;
			continue;
		}
		memcpy(oem, hdr->oem_id, ACPI_OEM_ID_SIZE);
		acpi_put_table(hdr);
		off += scnprintf(detail + off, len - off, "%s,", sigs[i]);
	}
	for_each_acpi_dev_match(adev, "LNRO0005", NULL, -1)
		virtio++;
	scnprintf(detail + off, len - off, " oem=%s LNRO0005=%u", strim(oem), virtio);
	return ok && virtio > 0;
#else
	scnprintf(detail, len, "kernel built without CONFIG_ACPI");
	return false;
#endif
}

struct selftest_check {
	const char *name;	/* printed in the result line; selects this check */
	const char *group;	/* selects every check of the group */
	check_fn run;
};

/* Run in this order; blk-write runs first, while the disks are untouched. */
static const struct selftest_check checks[] = {
	{ "blk-write",   "blk",     check_blk_write },
	{ "blk-ro",      "blk",     check_blk_ro },
	{ "blk-serial",  "blk",     check_blk_serial },
	{ "blk-discard", "blk",     check_blk_discard },
	{ "blk-flush",   "blk",     check_blk_flush },
	{ "console",     "console", check_console },
	{ "acpi",        "acpi",    check_acpi },
};

/* Whether the comma-separated @list names @check or its group. */
static bool selected(const char *list, const struct selftest_check *check)
{
	const char *p = list;

	while (*p) {
		size_t n = strcspn(p, ",");

		if ((strlen(check->name) == n && !strncmp(p, check->name, n)) ||
		    (strlen(check->group) == n && !strncmp(p, check->group, n)))
			return true;
		p += n;
		if (*p == ',')
			p++;
	}
	return false;
}

/* Whether @word (@n bytes, not NUL-terminated) names any check or group. */
static bool known(const char *word, size_t n)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(checks); i++)
		if ((strlen(checks[i].name) == n && !strncmp(word, checks[i].name, n)) ||
		    (strlen(checks[i].group) == n && !strncmp(word, checks[i].group, n)))
			return true;
	return false;
}

/*
 * Called by kernel_init() once the root file system is mounted and init
 * memory is freed, right before init is executed. Does nothing unless
 * rvmm_selftest= is on the command line; otherwise it does not return.
 */
void rvmm_selftest_run(void)
{
	unsigned int passed = 0, failed = 0;
	char detail[256];
	const char *p;
	ktime_t start;
	size_t i, n;

	if (!selftest_arg[0])
		return;

	info("running \"%s\"", selftest_arg);

	/* A name that selects nothing is a failure, not silently no test. */
	for (p = selftest_arg; *p; p += n + (p[n] == ',')) {
		n = strcspn(p, ",");
		if (n && !known(p, n)) {
			result("%.*s fail unknown check", (int)n, p);
			failed++;
		}
	}

	for (i = 0; i < ARRAY_SIZE(checks); i++) {
		bool ok;

		if (!selected(selftest_arg, &checks[i]))
			continue;
		detail[0] = '\0';
		start = ktime_get();
		ok = checks[i].run(detail, sizeof(detail));
		/*
		 * Files closed by a kernel thread are released by a work item;
		 * finish those releases (e.g. hvc's drain on close) before the
		 * next check.
		 */
		flush_delayed_fput();
		result("%s %s %s", checks[i].name, ok ? "ok" : "fail", detail);
		info("%s took %lld ms", checks[i].name, ktime_ms_delta(ktime_get(), start));
		if (ok)
			passed++;
		else
			failed++;
	}

	result("done passed=%u failed=%u", passed, failed);

	/* printk is synchronous here; the pause lets a buffering console drain. */
	msleep(20);
	if (selftest_poweroff)
		kernel_power_off();
	kernel_restart(NULL);
}
