"""GAN Dissection of a StylEx generator (Bau et al., ICLR 2019), tied to AttFind.

- :mod:`stylex.dissect.base`: units (channels of synthesis conv outputs), the segmenter contract;
- :mod:`stylex.dissect.segmenter`: the synthetic U-Net and user-supplied segmenters;
  :mod:`stylex.dissect.gradcam`: the classifier's class evidence as concepts;
- :mod:`stylex.dissect.stats`: streaming quantiles and IoU;
- :mod:`stylex.dissect.dissection`: which unit draws what (:func:`dissect`);
- :mod:`stylex.dissect.edits`: the intervention on a unit layer (ablation, insertion) and batched renders;
- :mod:`stylex.dissect.intervention`: ACE, α unit sets, ablation curves, insertion at a location,
  the classifier's response; :mod:`stylex.dissect.artifacts`: artifact units;
- :mod:`stylex.dissect.localise`: where AttFind's attributes act;
- :mod:`stylex.dissect.pipeline` and :mod:`stylex.dissect.report`: a whole run and its report.
"""
