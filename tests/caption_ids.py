"""Random caption token ids in the project's layout (docs/design.md "Tokens"), for model tests."""
import torch

SOT, EOT = 49406, 49407


def captions(lengths, context=77, seed=0):
    """Right-padded `SOT w.. EOT 0..` ids and masks, LongTensor[N, context] each; lengths count SOT and EOT."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1:length - 1] = torch.randint(1, 49000, (length - 2,), generator=generator)
        ids[row, length - 1] = EOT
        mask[row, :length] = 1
    return ids, mask
