"""Front-to-back alpha compositing of depth-sorted Gaussians per screen tile (gsplat 1.5.3's
`rasterize_to_pixels_3dgs_fwd_kernel`), with static shapes and bounded backward memory.

gsplat's rule, per pixel (centre x + 0.5, y + 0.5) and per Gaussian of its tile, front to back:

    sigma = 0.5 (a dx^2 + c dy^2) + b dx dy          (conic (a, b, c), d = mean - pixel centre)
    alpha = min(0.999, opacity exp(-sigma))
    skip it if sigma < 0 or alpha < 1/255
    next_T = T (1 - alpha); if next_T <= 1e-4: stop (this Gaussian is not drawn; the pixel is done)
    colour += alpha T c;  T = next_T

and finally alpha = 1 - T and colour += T background.

Here every tile looks at `max_per_tile` slots of its sorted range (the rest masked), in chunks
of `chunk_size` Gaussians, a `lax.scan` over chunks per batch of tiles:

* within a chunk, sigma and alpha are computed at once for every (Gaussian, tile, pixel) triple;
  the transmittance then runs through the chunk's Gaussians with the rule above, literally (an
  inner `lax.scan` over the C Gaussians, each step elementwise over all the tiles' pixels). The
  weights and T are therefore bit for bit those of the sequential rule given the same alphas,
  including a stop in the middle of a chunk and a pixel that is done from an earlier chunk (the
  `done` flag is carried). On CPU this measured faster than a vectorised front-to-back product:
  `jnp.cumprod` lowers to a quadratic reduce-window, and an associative scan was 1.5x (8 tiles
  per batch) to 4x (64 tiles) slower in place, with a graph of slices and pads at every level;
* the chunk body is rematerialised (`jax.checkpoint`), so the backward pass stores only the
  carry (T, colour, done per pixel) per chunk;
* a chunk no pixel of the batch needs (its tile has run out of Gaussians, or the pixel is done)
  is skipped with `lax.cond`, and tiles are batched busiest first, so sparse or saturated tiles
  finish early instead of waiting for the busiest tile of the image.

Memory: the tiles' slots are gathered once, [tiles, max_per_tile] x (6 + channels) floats, and
the backward pass keeps tiles x tile_size^2 x (channels + 2) values per chunk.

`composite_tiles` is the one function that turns sorted tile ranges into pixels: a Pallas
kernel (a later fast path) replaces it behind the same signature.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# gsplat's thresholds (Common.h ALPHA_THRESHOLD, the kernel's clamp and stopping transmittance).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_STOP = 1e-4


def tile_pixel_centers(tiles_x: int, tiles_y: int, tile_size: int) -> jax.Array:
    """Pixel centres [tiles, tile_size^2, 2] (x, y) of every tile, row-major within a tile."""
    row, column = jnp.divmod(jnp.arange(tile_size * tile_size), tile_size)
    tile_row, tile_column = jnp.divmod(jnp.arange(tiles_x * tiles_y), tiles_x)
    x = (tile_column[:, None] * tile_size + column[None, :]).astype(jnp.float32) + 0.5
    y = (tile_row[:, None] * tile_size + row[None, :]).astype(jnp.float32) + 0.5
    return jnp.stack([x, y], axis=-1)


def composite_chunk(carry: tuple[jax.Array, jax.Array, jax.Array], chunk: dict[str, jax.Array],
                    pixels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Applies gsplat's sequential rule for the next C Gaussians of T tiles to all their pixels.

    carry: transmittance [T, P], colour [T, P, channels], done [T, P] (bool);
    chunk: the tiles' next Gaussians, front to back on the leading axis: means2d [C, T, 2],
      conics [C, T, 3], opacities [C, T], colors [C, T, channels], mask [C, T] (False: padding);
    pixels: pixel centres [T, P, 2].
    """
    delta_x = chunk["means2d"][..., None, 0] - pixels[..., 0]  # [C, T, P]
    delta_y = chunk["means2d"][..., None, 1] - pixels[..., 1]
    conic_a, conic_b, conic_c = (chunk["conics"][..., None, k] for k in range(3))
    sigma = 0.5 * (conic_a * delta_x * delta_x + conic_c * delta_y * delta_y) + conic_b * delta_x * delta_y
    # exp of a clamped sigma: where sigma < 0 the Gaussian is skipped anyway, and exp(-sigma) of a
    # large negative sigma would be inf (and its discarded gradient 0 * inf = NaN).
    alpha = jnp.minimum(MAX_ALPHA, chunk["opacities"][..., None] * jnp.exp(-jnp.maximum(sigma, 0.0)))
    passes = chunk["mask"][..., None] & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)

    def blend_one(state, gaussian):
        transmittance, done = state
        alpha, passes = gaussian
        next_transmittance = transmittance * (1 - alpha)
        done = done | (passes & (next_transmittance <= TRANSMITTANCE_STOP))
        drawn = passes & ~done
        weight = jnp.where(drawn, alpha * transmittance, 0)
        return (jnp.where(drawn, next_transmittance, transmittance), done), weight

    transmittance, color, done = carry
    (transmittance, done), weights = jax.lax.scan(blend_one, (transmittance, done), (alpha, passes))
    color = color + jnp.einsum("ctp,ctd->tpd", weights, chunk["colors"], precision=jax.lax.Precision.HIGHEST)
    return transmittance, color, done


def composite_tiles(means2d: jax.Array, conics: jax.Array, opacities: jax.Array, colors: jax.Array,
                    gaussian_ids: jax.Array, tile_offsets: jax.Array, tile_counts: jax.Array,
                    background: jax.Array | None, *, width: int, height: int, tile_size: int, max_per_tile: int,
                    chunk_size: int, tiles_per_batch: int) -> tuple[jax.Array, jax.Array]:
    """Composites each tile's depth-sorted Gaussians into an image.

    means2d [N, 2], conics [N, 3], opacities [N], colors [N, channels]: the projected Gaussians;
    gaussian_ids [M]: Gaussian indices sorted by (tile, depth); tile_offsets, tile_counts
    [tiles_y, tiles_x]: each tile's range in gaussian_ids; background [channels] or None (black).
    Tiles with more than max_per_tile Gaussians are cut off there (the caller reports it).
    Returns colours [height, width, channels] and alphas [height, width, 1].

    Tiles are composited `tiles_per_batch` at a time (`lax.map` over batches), busiest first, so
    that a batch of sparse or early-saturated tiles skips the chunks it does not need instead of
    waiting for the busiest tile of the image.

    The seam for a fast path: a Pallas kernel replaces this function, same arguments and outputs.
    """
    means2d, conics, opacities, colors = (jnp.asarray(value) for value in (means2d, conics, opacities, colors))
    tiles_y, tiles_x = tile_offsets.shape
    num_tiles, pixels_per_tile, channels = tiles_x * tiles_y, tile_size * tile_size, colors.shape[-1]
    num_chunks = -(-max_per_tile // chunk_size)
    num_batches = -(-num_tiles // tiles_per_batch)
    dtype = means2d.dtype

    counts = jnp.minimum(tile_counts.reshape(-1), max_per_tile)
    # Busiest tiles first, padded with empty tiles (count 0) to whole batches.
    order = jnp.argsort(-counts, stable=True)
    order = jnp.concatenate([order, jnp.full(num_batches * tiles_per_batch - num_tiles, num_tiles, order.dtype)])
    batch_counts = jnp.concatenate([counts, jnp.zeros(1, counts.dtype)])[order]
    batch_offsets = jnp.concatenate([tile_offsets.reshape(-1), jnp.zeros(1, tile_offsets.dtype)])[order]
    pixels = tile_pixel_centers(tiles_x, tiles_y, tile_size).astype(dtype)
    batch_pixels = jnp.concatenate([pixels, jnp.zeros_like(pixels[:1])])[order]

    # Every tile's slots, gathered once up front ([batches, chunks, chunk_size, tiles_per_batch]):
    # the scans then carry only pixels, and the backward pass scatters into the Gaussians once.
    position = jnp.arange(num_chunks * chunk_size, dtype=jnp.int32)
    slot = jnp.minimum(batch_offsets[:, None] + position, gaussian_ids.shape[0] - 1)
    ids = gaussian_ids[slot]

    def by_chunk(values: jax.Array) -> jax.Array:
        values = values.reshape((num_batches, tiles_per_batch, num_chunks, chunk_size) + values.shape[2:])
        return jnp.moveaxis(values, 1, 3)  # [batches, chunks, chunk_size, tiles_per_batch, ...]

    chunks = {
        "means2d": by_chunk(means2d[ids]),
        "conics": by_chunk(conics[ids]),
        "opacities": by_chunk(opacities[ids]),
        "colors": by_chunk(colors[ids]),
        "mask": by_chunk(position < batch_counts[:, None]),
    }

    def composite_batch(batch):
        batch_chunks, counts, pixels = batch

        # prevent_cse=False: inside a scan nothing can be CSE'd across steps; the guard only costs.
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def step(carry, chunk_and_index):
            chunk, index = chunk_and_index
            # Skip a chunk no pixel needs: its tile has run out of Gaussians, or the pixel is done
            # (under vmap this becomes a select, which computes the chunk anyway).
            needed = jnp.any(~carry[2] & (index * chunk_size < counts)[:, None])
            carry = jax.lax.cond(needed, lambda c: composite_chunk(c, chunk, pixels), lambda c: c, carry)
            return carry, None

        initial = (jnp.ones((tiles_per_batch, pixels_per_tile), dtype),
                   jnp.zeros((tiles_per_batch, pixels_per_tile, channels), dtype),
                   jnp.zeros((tiles_per_batch, pixels_per_tile), bool))
        (transmittance, color, _), _ = jax.lax.scan(step, initial, (batch_chunks, jnp.arange(num_chunks)))
        return transmittance, color

    transmittance, color = jax.lax.map(
        composite_batch, (chunks, batch_counts.reshape(num_batches, -1), batch_pixels.reshape(num_batches, -1,
                                                                                            pixels_per_tile, 2)))
    # Back from batch order to tile order.
    tile_slot = jnp.zeros(num_tiles, order.dtype).at[order[:num_tiles]].set(jnp.arange(num_tiles, dtype=order.dtype))
    transmittance = transmittance.reshape(-1, pixels_per_tile)[tile_slot]
    color = color.reshape(-1, pixels_per_tile, channels)[tile_slot]
    if background is not None:
        color = color + transmittance[..., None] * background
    alpha = 1 - transmittance

    def to_image(values: jax.Array) -> jax.Array:
        values = values.reshape(tiles_y, tiles_x, tile_size, tile_size, -1).transpose(0, 2, 1, 3, 4)
        return values.reshape(tiles_y * tile_size, tiles_x * tile_size, -1)[:height, :width]

    return to_image(color), to_image(alpha[..., None])
