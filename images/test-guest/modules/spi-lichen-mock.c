// SPDX-License-Identifier: GPL-2.0
/*
 * spi-lichen-mock: a mock SPI controller for Lichen's real-kernel test guest.
 *
 * Debian's kernels have no SPI simulator, so this module stands in for the hardware: it
 * registers SPI bus 0 with one device on chip-select 0 named "dh2228fv", the name the built-in
 * spidev driver binds to, which makes /dev/spidev0.0 appear. Every transfer is answered bit
 * by bit by a model of a Microchip MCP3008 (8-channel 10-bit ADC): after a start bit come
 * SGL/DIFF and three channel bits, one sample clock, a null bit, then the ten bits of the
 * conversion MSB first (then LSB first, then zeros, as the datasheet's figure 6-1 shows).
 *
 * The channel inputs are a register file the test sets from outside:
 *   /sys/module/spi_lichen_mock/parameters/codes   (eight codes, 0..1023, comma-separated)
 * and /sys/module/spi_lichen_mock/parameters/transfers counts the transfers answered.
 *
 * This is a mock (no such hardware exists here), named as one.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/platform_device.h>
#include <linux/spi/spi.h>
#include <linux/spinlock.h>

static ushort codes[8] = { 512, 256, 768, 1023, 0, 100, 200, 300 };
static int ncodes = 8;
module_param_array(codes, ushort, &ncodes, 0644);
MODULE_PARM_DESC(codes, "conversion result of each MCP3008 channel (0..1023)");

static unsigned int transfers;
module_param(transfers, uint, 0444);
MODULE_PARM_DESC(transfers, "SPI transfers answered so far");

/* The MCP3008's serial state, counted in clocks since the start bit. */
struct mcp3008 {
	bool started;
	unsigned int clock;	/* clocks since the start bit */
	u8 config;		/* SGL/DIFF, D2, D1, D0 */
	u16 code;
};

static struct platform_device *mock_pdev;
static struct spi_controller *mock_ctlr;
static struct spi_device *mock_dev;
static struct mcp3008 adc;
static DEFINE_SPINLOCK(adc_lock);

static void mcp3008_reset(struct mcp3008 *m)
{
	m->started = false;
	m->clock = 0;
	m->config = 0;
	m->code = 0;
}

static u16 mcp3008_convert(u8 config)
{
	unsigned int channel = config & 0x7;
	int value;

	if (config & 0x8)
		value = READ_ONCE(codes[channel]);
	else	/* differential: IN+ is the channel, IN- its pair */
		value = (int)READ_ONCE(codes[channel]) - (int)READ_ONCE(codes[channel ^ 1]);
	return clamp(value, 0, 1023);
}

/* One clock: takes the bit on DIN, returns the bit on DOUT. */
static int mcp3008_clock(struct mcp3008 *m, int din)
{
	unsigned int n;

	if (!m->started) {
		if (din)
			m->started = true;
		return 0;
	}
	n = ++m->clock;
	if (n <= 4) {
		m->config = (m->config << 1) | din;
		if (n == 4)
			m->code = mcp3008_convert(m->config);
		return 0;
	}
	if (n <= 6)		/* sample clock, then the null bit */
		return 0;
	if (n <= 16)		/* B9 .. B0 */
		return (m->code >> (16 - n)) & 1;
	if (n <= 25)		/* B1 .. B9 */
		return (m->code >> (n - 16)) & 1;
	return 0;
}

static int mock_transfer_one(struct spi_controller *ctlr, struct spi_device *spi,
			     struct spi_transfer *t)
{
	const u8 *tx = t->tx_buf;
	u8 *rx = t->rx_buf;
	unsigned long flags;
	unsigned int i;
	int bit;

	spin_lock_irqsave(&adc_lock, flags);
	for (i = 0; i < t->len; i++) {
		u8 out = 0, in = tx ? tx[i] : 0;

		for (bit = 7; bit >= 0; bit--)
			out |= mcp3008_clock(&adc, (in >> bit) & 1) << bit;
		if (rx)
			rx[i] = out;
	}
	transfers++;
	spin_unlock_irqrestore(&adc_lock, flags);
	return 0;	/* done: the core finalizes the transfer */
}

/* Any change of chip-select starts a new conversion frame. */
static void mock_set_cs(struct spi_device *spi, bool level)
{
	unsigned long flags;

	spin_lock_irqsave(&adc_lock, flags);
	mcp3008_reset(&adc);
	spin_unlock_irqrestore(&adc_lock, flags);
}

static int mock_prepare_message(struct spi_controller *ctlr, struct spi_message *msg)
{
	mock_set_cs(msg->spi, false);
	return 0;
}

static int __init mock_init(void)
{
	struct spi_board_info info = {
		.modalias = "dh2228fv",
		.max_speed_hz = 3600000,
		.bus_num = 0,
		.chip_select = 0,
		.mode = SPI_MODE_0,
	};
	int ret;

	mock_pdev = platform_device_register_simple("spi-lichen-mock", -1, NULL, 0);
	if (IS_ERR(mock_pdev))
		return PTR_ERR(mock_pdev);

	mock_ctlr = spi_alloc_master(&mock_pdev->dev, 0);
	if (!mock_ctlr) {
		ret = -ENOMEM;
		goto err_pdev;
	}
	mock_ctlr->bus_num = 0;
	mock_ctlr->num_chipselect = 1;
	mock_ctlr->mode_bits = SPI_CPOL | SPI_CPHA | SPI_CS_HIGH;
	mock_ctlr->bits_per_word_mask = SPI_BPW_MASK(8);
	mock_ctlr->min_speed_hz = 10000;
	mock_ctlr->max_speed_hz = 3600000;
	mock_ctlr->transfer_one = mock_transfer_one;
	mock_ctlr->set_cs = mock_set_cs;
	mock_ctlr->prepare_message = mock_prepare_message;

	ret = spi_register_controller(mock_ctlr);
	if (ret) {
		spi_controller_put(mock_ctlr);
		goto err_pdev;
	}
	mock_dev = spi_new_device(mock_ctlr, &info);
	if (!mock_dev) {
		ret = -ENODEV;
		goto err_ctlr;
	}
	pr_info("spi-lichen-mock: MCP3008 model on spi0.0 (%s)\n", info.modalias);
	return 0;

err_ctlr:
	spi_unregister_controller(mock_ctlr);
err_pdev:
	platform_device_unregister(mock_pdev);
	return ret;
}

static void __exit mock_exit(void)
{
	spi_unregister_device(mock_dev);
	spi_unregister_controller(mock_ctlr);
	platform_device_unregister(mock_pdev);
}

module_init(mock_init);
module_exit(mock_exit);

MODULE_DESCRIPTION("Mock SPI controller with an MCP3008 model, for Lichen's test guest");
MODULE_LICENSE("GPL");
